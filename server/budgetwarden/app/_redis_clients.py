"""The sidecar's Redis clients: one Redis, a Cluster, or a master behind Sentinel; and, for ``--durability``, a client
whose script calls are answered only once the write is confirmed (fsynced locally, or held by N replicas)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from budgetwarden.store import (
    AnyRedis,
    SentinelTarget,
    SentinelUrlError,
    async_sentinel_master,
    close_sentinels,
    is_sentinel_url,
    parse_sentinel_url,
    unconfirmed_script_shas,
)

from ._config import Settings
from ._redis_access import redis_access_options

# How long a confirmation waits before the call fails (UNAVAILABLE; reports are idempotent, retry them).
CONFIRM_TIMEOUT_MS = 1000
_SCRIPT_COMMANDS = frozenset({"EVALSHA", "EVAL"})


@dataclass(frozen=True)
class WriteConfirmation:
    """A command sent after each script call on the same connection (WAIT and WAITAOF wait for that connection's
    writes), and how many confirmations its answer must count."""

    name: str
    command: tuple[Any, ...]
    needed: int
    what: str  # what is confirmed, for the error that refuses the start

    def count(self, answer: Any) -> int:
        # WAITAOF answers [local fsyncs, replica fsyncs]; WAIT answers the number of replicas.
        return int(answer[0]) if isinstance(answer, list | tuple) else int(answer)

    def failure(self, got: int) -> str:
        return f"--durability {self.name}: {got} of {self.needed} confirmations in {CONFIRM_TIMEOUT_MS} ms"


def aof_local() -> WriteConfirmation:
    """Fsynced to this Redis's append-only file (Redis or Valkey 7.2+, appendonly yes)."""
    return WriteConfirmation("aof-local", ("WAITAOF", 1, 0, CONFIRM_TIMEOUT_MS), 1, "fsyncs")


def replicas(count: int) -> WriteConfirmation:
    """Received by ``count`` replicas (in their memory): a failover to one of them keeps the write."""
    return WriteConfirmation("replicas", ("WAIT", count, CONFIRM_TIMEOUT_MS), count, "replication")


_UNCONFIRMED_SHAS = unconfirmed_script_shas()


def _needs_confirmation(args: tuple[Any, ...]) -> bool:
    command = str(args[0]).upper()
    if command == "EVALSHA" and len(args) > 1:
        return str(args[1]) not in _UNCONFIRMED_SHAS
    return command in _SCRIPT_COMMANDS


class ConfirmedPipeline(Pipeline):
    confirmation: WriteConfirmation

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        if not any(_needs_confirmation(args) for args, _ in self.command_stack):
            return await super().execute(raise_on_error)
        self.pipeline_execute_command(*self.confirmation.command)  # type: ignore[no-untyped-call]
        *replies, answer = await super().execute(raise_on_error)
        got = self.confirmation.count(answer)
        if got < self.confirmation.needed:
            raise RedisTimeoutError(self.confirmation.failure(got))
        return replies


class ConfirmedRedis(Redis):
    """Each script call goes out in one pipeline with its confirmation. Subclassed per confirmation, because Sentinel
    makes its client from a class."""

    confirmation: ClassVar[WriteConfirmation]

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> ConfirmedPipeline:
        pipe = ConfirmedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.confirmation = self.confirmation
        return pipe

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if not _needs_confirmation(args):
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        async with self.pipeline(transaction=False) as pipe:
            pipe.execute_command(*args, **options)
            (reply,) = await pipe.execute()
        return reply


def confirmed_class(confirmation: WriteConfirmation) -> type[ConfirmedRedis]:
    return type(f"ConfirmedRedis_{confirmation.name}", (ConfirmedRedis,), {"confirmation": confirmation})


def sentinel_target(url: str) -> SentinelTarget:
    try:
        return parse_sentinel_url(url)
    except SentinelUrlError as exc:
        raise OSError(f"--redis-url: {exc}") from None  # not the URL itself: it may hold a password


def write_confirmation(settings: Settings, *, embedded: bool) -> WriteConfirmation | None:
    """What ``--durability`` asks of an external Redis (the embedded one fsyncs by its appendfsync instead)."""
    if embedded or settings.durability in (None, "none"):
        return None
    if settings.redis_cluster:
        raise OSError(f"--durability {settings.durability} is not supported with --redis-cluster: use none")
    if settings.durability == "aof-local":
        return aof_local()
    return replicas(settings.durability_replicas)


def redis_client(
    url: str,
    *,
    cluster: bool,
    confirmation: WriteConfirmation | None = None,
    socket_timeout: float | None = None,
    access: dict[str, Any] | None = None,
) -> AnyRedis:
    """One retry on a dropped connection: after Redis restarts (or fails over), every pooled connection is dead once.
    Every script the sidecar runs is idempotent (reservations, report markers, release states, decided checkpoints,
    ceiling changes by their request id), so a retry after a drop is safe. ``confirmation``: every script call waits
    for it (not with a Cluster).

    The limiter gives every store call its own deadline (and a call it gives up on closes its connection);
    ``socket_timeout`` is the backstop under that: no connect or read waits longer, so no stalled connection is
    waited on, or reused, forever. ``access``: credentials and TLS options (``redis_access_options``)."""
    options: dict[str, Any] = {
        **(access or {}),
        "retry": Retry(NoBackoff(), 1),
        "retry_on_error": [RedisConnectionError],
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
    }
    if cluster:
        return RedisCluster.from_url(url, **options)
    kind = Redis if confirmation is None else confirmed_class(confirmation)
    if is_sentinel_url(url):
        return async_sentinel_master(sentinel_target(url), kind, options)
    return kind.from_url(url, **options)


async def connect_store(
    settings: Settings, url: str, *, embedded: bool, socket_timeout: float
) -> tuple[AnyRedis, dict[str, Any]]:
    """The budget store's client for the sidecar and the control plane alike, and the access options (credentials,
    TLS) its other clients need too; refuses to start when ``--durability`` cannot be confirmed by this Redis."""
    access = {} if embedded else redis_access_options(settings)
    confirmation = write_confirmation(settings, embedded=embedded)
    client = redis_client(
        url,
        cluster=settings.redis_cluster,
        confirmation=confirmation,
        socket_timeout=socket_timeout,
        access=access,
    )
    if confirmation is not None:
        await check_confirmation(client, confirmation)
    return client, access


def ping_client(url: str, *, cluster: bool, timeout_s: float, access: dict[str, Any] | None = None) -> AnyRedis:
    """A client of its own for readiness pings: short timeouts, no retry, never queued behind budget calls."""
    options = {**(access or {}), "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if cluster:
        return RedisCluster.from_url(url, **options)
    if is_sentinel_url(url):
        return async_sentinel_master(sentinel_target(url), Redis, options)
    return Redis.from_url(url, **options)


async def close_client(client: AnyRedis) -> None:
    await client.aclose()
    await close_sentinels(client)


async def check_confirmation(client: AnyRedis, confirmation: WriteConfirmation) -> None:
    """Refuse to start when this Redis cannot give the confirmation (WAITAOF needs Redis/Valkey 7.2+ with appendonly;
    WAIT needs no more than it). Too few replicas now, or an unreachable Redis, is no reason to refuse: the calls wait
    (and fail with UNAVAILABLE or the fail mode) until they come."""
    try:
        await client.execute_command(*confirmation.command)
    except ResponseError as exc:
        raise OSError(
            f"--durability {confirmation.name}: this Redis cannot confirm {confirmation.what} ({exc}); turn on "
            "appendonly there (Redis or Valkey 7.2 or later) or use --durability none"
        ) from None
    except (RedisError, OSError):
        pass
