"""The sidecar's Redis clients: one Redis, a Cluster, or a master behind Sentinel; and, for ``--durability``, a client
whose script calls are answered only once the write is confirmed (fsynced locally, or held by N replicas)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from budgetwarden.store import (
    HASH_MAX_LISTPACK_VALUE,
    AnyRedis,
    LeanScripts,
    SentinelTarget,
    SentinelUrlError,
    async_sentinel_master,
    close_sentinels,
    is_sentinel_url,
    lean_scripts_for,
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


class WriteNotConfirmedError(RedisError):
    """Too few confirmations on a Cluster: neither a connection error nor a timeout, which the cluster client would
    answer by reading the topology again and resending the call."""


class _ConfirmedCommand(list[bytes]):
    """A packed script call with its confirmation packed behind it."""


class ConfirmingConnection(Connection):
    """A Cluster node's connection that sends each script call's confirmation right behind it, on itself, and answers
    the call only once the confirmation's answer counts enough. redis-py's cluster client sends each script call alone
    on one node's connection and reads its reply (it does not pipeline them), and WAIT and WAITAOF must go on the
    connection that wrote: so this is where the cluster's confirmation goes, under the slot routing, the MOVED
    handling and the retries of the cluster client, which then work for the pair as for one command.

    The reply read after a confirmed call is sent is that call's: the handshake of a new connection and any health
    check run inside the send, before the call is written."""

    confirmation: ClassVar[WriteConfirmation]
    _confirm_next = False

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = super().pack_command(*args)
        if not _needs_confirmation(args):
            return packed
        return _ConfirmedCommand([*packed, *super().pack_command(*self.confirmation.command)])

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        listed = [tuple(command) for command in commands]
        if any(_needs_confirmation(command) for command in listed):
            raise RedisError(f"--durability {self.confirmation.name}: a script call in a cluster pipeline")
        return super().pack_commands(listed)

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        await super().send_packed_command(command, check_health)
        self._confirm_next = isinstance(command, _ConfirmedCommand)

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if not self._confirm_next:
            return await super().read_response(*args, **kwargs)
        self._confirm_next = False
        try:
            reply = await super().read_response(*args, **kwargs)
        except ResponseError:
            await super().read_response()  # the confirmation's answer, so the next command reads its own
            raise
        got = self.confirmation.count(await super().read_response())
        if got < self.confirmation.needed:
            raise WriteNotConfirmedError(self.confirmation.failure(got))
        return reply

    async def disconnect(self, *args: Any, **kwargs: Any) -> None:
        self._confirm_next = False
        await super().disconnect(*args, **kwargs)


def confirming_cluster(url: str, confirmation: WriteConfirmation, options: dict[str, Any]) -> RedisCluster:
    """A cluster client whose nodes' connections confirm each script call (``ConfirmingConnection``). redis-py's
    cluster client takes no connection class: it is set in the options every node is made from (the startup nodes'
    and those the client finds later share them)."""
    client = RedisCluster.from_url(url, **options)
    base = client.connection_kwargs.get("connection_class", Connection)
    kind = type(f"Confirming{base.__name__}", (ConfirmingConnection, base), {"confirmation": confirmation})
    if client.nodes_manager.connection_kwargs is not client.connection_kwargs:
        raise OSError(f"--durability {confirmation.name} with --redis-cluster: this redis-py cannot confirm writes")
    client.connection_kwargs["connection_class"] = kind
    # The nodes made already, wherever this version of redis-py keeps them.
    for node in [*getattr(client, "startup_nodes", []), *client.nodes_manager.startup_nodes.values()]:
        node.connection_class = kind
    return client


def sentinel_target(url: str) -> SentinelTarget:
    try:
        return parse_sentinel_url(url)
    except SentinelUrlError as exc:
        raise OSError(f"--redis-url: {exc}") from None  # not the URL itself: it may hold a password


def write_confirmation(settings: Settings, *, embedded: bool) -> WriteConfirmation | None:
    """What ``--durability`` asks of an external Redis (the embedded one fsyncs by its appendfsync instead)."""
    if embedded or settings.durability in (None, "none"):
        return None
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
    for it (on a Cluster, for the replicas of the primary that ran it).

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
        if confirmation is not None:
            return confirming_cluster(url, confirmation, options)
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


def lean_scripts(settings: Settings, client: AnyRedis, *, embedded: bool, socket_timeout: float) -> LeanScripts | None:
    """The lean client for checks' script calls (``--lean-redis-client``), or None where redis-py stays: a Cluster, a
    Sentinel-managed master, and ``--durability`` other than none (its confirmation must follow each script call on
    the same connection, which only the redis-py clients above do)."""
    if not settings.lean_redis_client or settings.redis_cluster:
        return None
    if write_confirmation(settings, embedded=embedded) is not None:
        return None
    return lean_scripts_for(client, socket_timeout=socket_timeout)


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


# The shortest `scopes` field a reservation record can have: a task and two windows of a one-character tenant, about 40
# bytes each. Below it, every record is a hashtable.
_SHORTEST_SCOPES_FIELD = 128


async def listpack_limit(client: AnyRedis) -> int | None:
    """The server's ``hash-max-listpack-value`` (a Cluster client asks its default node), or None when it cannot be
    read: CONFIG is often disabled on managed Redis, and an older Redis names it differently (an empty reply)."""
    try:
        reply = await client.config_get("hash-max-listpack-value")
    except (RedisError, OSError):
        return None
    value = reply.get("hash-max-listpack-value")  # redis-py decodes CONFIG GET's names and values
    return int(value) if isinstance(value, str) and value.isdigit() else None


def listpack_advice(limit: int | None) -> str | None:
    """What to tell the operator of a server whose records cannot stay listpacks, or None."""
    if limit is None or limit >= _SHORTEST_SCOPES_FIELD:
        return None
    return (
        f"this Redis keeps hash values of at most {limit} bytes in the compact listpack encoding "
        "(hash-max-listpack-value), and every reservation record has a longer one: records take about twice the "
        f"memory; set hash-max-listpack-value {HASH_MAX_LISTPACK_VALUE}, as budgetwarden's own servers do "
        "(docs/storage.md)"
    )
