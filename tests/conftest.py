"""Fixtures: a real Redis-compatible server started on a free port for the session, flushed between tests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from budgetwarden.app import Settings
from budgetwarden.limiter import Clock
from budgetwarden.store._embedded import EmbeddedRedis

from support import FAST_WATCH, BlackHole, RunningSidecar, free_port, sidecar_settings
from support_policies import ENGINE_POLICY

# What the test process started with. Importing some libraries changes it for the whole process: LiteLLM's token
# counter sets TIKTOKEN_CACHE_DIR to its bundled encodings (o200k_base among them) when first used, so a later test's
# in-process sidecar would count exactly what that test expects to be unavailable offline.
_TIKTOKEN_CACHE_DIR_AT_START = os.environ.get("TIKTOKEN_CACHE_DIR")


@pytest.fixture(autouse=True)
def _tiktoken_cache_dir_as_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    if _TIKTOKEN_CACHE_DIR_AT_START is None:
        monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", _TIKTOKEN_CACHE_DIR_AT_START)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=free_port(), persistent=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
async def async_redis(redis_url: str) -> AsyncIterator[AsyncRedis]:
    client = AsyncRedis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def start_sidecar(redis_url: str) -> Iterator[Callable[..., RunningSidecar]]:
    """Start sidecars against the test's Redis; keyword arguments override settings. Each sidecar runs on its own
    ``SettableClock`` (``running.clock``) unless ``clock=`` gives another (``wall_clock_ms`` for the real time)."""
    started: list[RunningSidecar] = []

    def start(*, clock: Clock | None = None, **overrides: Any) -> RunningSidecar:
        running = RunningSidecar(sidecar_settings(redis_url, **overrides), clock).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def sidecar(start_sidecar: Callable[..., RunningSidecar]) -> RunningSidecar:
    """A sidecar with the built-in default policy."""
    return start_sidecar()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


@pytest.fixture
def embedded_sidecar(tmp_path: Path) -> Iterator[Callable[..., RunningSidecar]]:
    """Sidecars that start their own embedded server in ``tmp_path/data`` (one data dir for all of a test's sidecars,
    as a restarted pod would have); keyword arguments override settings."""
    started: list[RunningSidecar] = []

    def start(**overrides: Any) -> RunningSidecar:
        values: dict[str, Any] = {
            "listen": f"127.0.0.1:{free_port()}",
            "data_dir": tmp_path / "data",
            "log_format": "text",
            **FAST_WATCH,
        }
        values.update(overrides)
        running = RunningSidecar(Settings(**values)).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def engine_policy_file(tmp_path: Path) -> Path:
    """The policy engine's walk (support_policies.ENGINE_POLICY) in a file."""
    path = tmp_path / "policy.yaml"
    path.write_text(ENGINE_POLICY)
    return path
