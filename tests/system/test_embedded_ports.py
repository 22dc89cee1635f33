"""The embedded server listens where it says it does: a TCP port another server already holds is never mistaken for
its own, and a port budgetwarden chose itself is chosen again (the data dir's path is too long for a unix socket)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from budgetwarden.store import _embedded
from budgetwarden.store._embedded import EmbeddedError, EmbeddedRedis

from support import free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def other_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "other", port=free_port(), persistent=False)
    server.start()
    yield server
    server.stop()


def answering_pid(server: EmbeddedRedis) -> int:
    client = redis.Redis.from_url(server.url)
    try:
        pid: int = client.info("server")["process_id"]
        return pid
    finally:
        client.close()


def too_long_for_a_socket(tmp_path: Path) -> Path:
    data_dir = tmp_path / ("d" * 100)
    assert len(str(data_dir / "redis.sock")) > _embedded._MAX_UNIX_PATH, "the test needs a TCP embedded server"
    return data_dir


def test_a_port_it_chose_that_another_server_took_is_replaced_by_another(
    tmp_path: Path, other_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    choices = iter([other_server.port, free_port()])
    monkeypatch.setattr(_embedded, "free_port", lambda: next(choices))
    ours = EmbeddedRedis(too_long_for_a_socket(tmp_path), persistent=False)
    assert ours.port == other_server.port  # the race, made certain: the chosen port is taken before the child binds
    with ours:
        assert ours.port != other_server.port
        assert answering_pid(ours) == ours.pid
    assert answering_pid(other_server) == other_server.pid  # the other server was never touched


def test_a_port_the_caller_gave_that_another_server_holds_is_an_error(
    tmp_path: Path, other_server: EmbeddedRedis
) -> None:
    ours = EmbeddedRedis(tmp_path / "ours", port=other_server.port, persistent=False)
    with pytest.raises(EmbeddedError, match="exited"):
        ours.start()
    assert ours.exit_code is None  # nothing left running
    assert answering_pid(other_server) == other_server.pid
