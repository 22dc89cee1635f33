"""Issue 11, item 13: an acknowledged report is on disk before its answer leaves.

With ``appendfsync everysec`` Valkey may postpone writing its append-only file while a background fsync is slow, so a
SIGKILL of Valkey can lose writes it already acknowledged. The sidecar's embedded server therefore runs
``appendfsync always`` by default (``--durability aof-local``); with an external Redis, ``aof-local`` sends a
``WAITAOF 1 0`` with every script call. These tests kill Valkey right after acknowledgements while another thread
keeps the disk busy, and find every acknowledged report again.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis

from budgetwarden.app._config import Settings
from budgetwarden.store._embedded import EmbeddedRedis
from budgetwarden_client import BudgetClient, pb

from support import RunningSidecar, embedded_of, free_port

pytestmark = pytest.mark.slow

WAIT_S = 60.0
TRIALS = 5
REPORTERS = 3
ACKED = (pb.REPORT_STATUS_APPLIED, pb.REPORT_STATUS_UNRESERVED)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting until {what}"
        time.sleep(0.02)


def record(key: str) -> pb.UsageRecord:
    return pb.UsageRecord(
        tenant_id="acme", task_id="durable", step_id=key, input_tokens=100, output_tokens=10, idempotency_key=key
    )


class DiskLoad:
    """A thread that writes and fsyncs a file in ``directory`` without pause: slow fsyncs for the server there."""

    CHUNK = os.urandom(1 << 20)
    MAX_BYTES = 64 << 20

    def __init__(self, directory: Path) -> None:
        self.path = directory / "disk-load"
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.path.open("wb") as file:
            while not self._stop.is_set():
                if file.tell() >= self.MAX_BYTES:
                    file.seek(0)
                file.write(self.CHUNK)
                file.flush()
                os.fsync(file.fileno())
                self.rounds += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.path.unlink(missing_ok=True)


def appendfsync(url: str) -> str:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return str(client.config_get("appendfsync")["appendfsync"])
    finally:
        client.close()


def test_the_embedded_server_fsyncs_every_write_unless_told_otherwise(
    embedded_sidecar: Callable[..., RunningSidecar], tmp_path: Path
) -> None:
    assert appendfsync(embedded_of(embedded_sidecar()).url) == "always"
    relaxed = embedded_sidecar(data_dir=tmp_path / "relaxed", durability="none")
    assert appendfsync(embedded_of(relaxed).url) == "everysec"


def send_until_killed(sidecar: RunningSidecar, kill_after: int, keys: Iterator[str]) -> list[str]:
    """Reporters send reports until one of them, right after the ``kill_after``-th acknowledgement, SIGKILLs the
    embedded server; returns the keys of every acknowledged report."""
    embedded = embedded_of(sidecar)
    pid = embedded.pid
    assert pid is not None
    acked: list[str] = []
    lock = threading.Lock()
    killed = threading.Event()

    def report_until_killed() -> None:
        with BudgetClient(sidecar.addr, timeout=30) as client:
            while not killed.is_set():
                with lock:
                    key = next(keys)
                try:
                    (result,) = client.report([record(key)]).results
                except grpc.RpcError:
                    continue  # the server is gone; not acknowledged
                assert result.status in ACKED, result
                with lock:
                    acked.append(key)
                    if len(acked) >= kill_after and not killed.is_set():
                        os.kill(pid, signal.SIGKILL)  # right after this acknowledgement, others in flight
                        killed.set()

    threads = [threading.Thread(target=report_until_killed, daemon=True) for _ in range(REPORTERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert not any(thread.is_alive() for thread in threads), "a reporter never finished"
    assert killed.is_set()
    return acked


def test_sigkill_right_after_acknowledgements_under_disk_load_loses_nothing(
    embedded_sidecar: Callable[..., RunningSidecar], tmp_path: Path
) -> None:
    sidecar = embedded_sidecar()
    embedded = embedded_of(sidecar)
    load = DiskLoad(embedded.data_dir)
    keys = (f"k{n}" for n in itertools.count())
    try:
        for trial in range(TRIALS):
            killed_pid = embedded.pid
            acked = send_until_killed(sidecar, kill_after=25 + 10 * trial, keys=keys)
            wait_for(lambda pid=killed_pid: embedded.pid != pid and embedded.exit_code is None, "a restarted server")
            with BudgetClient(sidecar.addr, timeout=30) as client:

                def answers() -> bool:
                    try:
                        return not client.check(
                            tenant_id="acme", task_id="probe", step_id="s", estimated_input_tokens=1
                        ).from_fail_mode
                    except grpc.RpcError:
                        return False

                wait_for(answers, "the restarted server answers")
                # Every acknowledged report is in the append-only file the server was restarted from.
                replies = client.report([record(key) for key in acked]).results
                lost = [
                    key for key, reply in zip(acked, replies, strict=True) if reply.status != pb.REPORT_STATUS_DUPLICATE
                ]
                assert not lost, f"trial {trial}: {len(lost)} of {len(acked)} acknowledged reports lost: {lost[:10]}"
    finally:
        load.close()
    assert load.rounds > 0, "the disk was never loaded"


# --- an external Redis: WAITAOF -------------------------------------------------------------------------------------


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """An "external" Redis with an append-only file on ``everysec``, as a default Redis runs."""
    server = EmbeddedRedis(tmp_path / "external", port=free_port(), persistent=True, appendfsync="everysec")
    server.start()
    yield server
    server.kill()


def test_aof_local_on_an_external_redis_waits_for_the_fsync_of_each_call(
    start_sidecar: Callable[..., RunningSidecar], aof_redis: EmbeddedRedis
) -> None:
    sidecar = start_sidecar(redis_url=aof_redis.url, durability="aof-local")
    client = redis.Redis.from_url(aof_redis.url)
    try:
        before = int(client.info("commandstats").get("cmdstat_waitaof", {}).get("calls", 0))
        with BudgetClient(sidecar.addr, timeout=30) as budget:
            check = budget.check(tenant_id="acme", task_id="t", step_id="s", estimated_input_tokens=10)
            assert check.decision == pb.DECISION_ALLOW
            assert not check.from_fail_mode
            (result,) = budget.report([record("w1"), record("w2")]).results[:1]
            assert result.status in ACKED
        after = int(client.info("commandstats")["cmdstat_waitaof"]["calls"])
    finally:
        client.close()
    assert after - before >= 2  # the check's script call and the report's


def test_aof_local_on_a_redis_without_an_append_only_file_refuses_to_start(redis_url: str) -> None:
    """The session's Redis runs without an append-only file: WAITAOF cannot confirm anything."""
    settings = Settings(listen=f"127.0.0.1:{free_port()}", redis_url=redis_url, durability="aof-local")
    running = RunningSidecar(settings)
    try:
        with pytest.raises(OSError, match="--durability aof-local: this Redis cannot confirm fsyncs"):
            running.start()
    finally:
        running.stop()
