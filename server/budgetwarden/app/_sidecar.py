"""Assembles the sidecar: store, limiter, gRPC server with health and reflection, signals, embedded Redis."""

from __future__ import annotations

import asyncio
import functools
import io
import ipaddress
import itertools
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator, Sequence

import grpc
import redis
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from budgetwarden.allowance import Allowances, AllowanceSettings
from budgetwarden.domain import LoadedPolicy, Planner, PolicyError, default_policy, load_policy
from budgetwarden.limiter import Clock, Limiter, wall_clock_ms
from budgetwarden.store import (
    AllowanceStore,
    AnyRedis,
    BudgetStore,
    EmbeddedRedis,
    GaugeReader,
    LeanScripts,
    Retention,
    raise_if_cancelled,
)
from budgetwarden.telemetry import Telemetry, telemetry_from_env
from budgetwarden.transport import BUDGET_SERVICE_NAME, Admission, BudgetServicer

from ._config import Settings
from ._listener_tls import ReloadingServerCredentials
from ._redis_clients import (
    close_client,
    connect_store,
    lean_scripts,
    listpack_advice,
    listpack_limit,
    ping_client,
)

log = logging.getLogger("budgetwarden.server")

# gRPC shares a port between processes by default (SO_REUSEPORT): a second sidecar on a taken port would quietly take
# half the calls, perhaps with another policy or store. Off, it fails to start with "address in use" instead.
_SERVER_OPTIONS = [("grpc.so_reuseport", 0)]

# Health names. Liveness is SERVING while the process serves, so the kubelet never restarts a sidecar for a store
# outage it cannot fix; readiness ("" and the budget service) is SERVING only while the store answers.
LIVENESS = "liveness"
READINESS = ("", BUDGET_SERVICE_NAME)
# A crashed embedded server is started again after these waits, doubling up to the last (seconds).
# How long a step of the shutdown may take beyond the grace period before it is logged and left behind.
STOP_STEP_LIMIT_S = 5.0
RESTART_FIRST_DELAY_S = 0.1
RESTART_MAX_DELAY_S = 5.0
# How long a restarted server may take to load its append-only file and answer (it answers LOADING meanwhile).
RESTART_READY_TIMEOUT_S = 120.0

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


@functools.cache
def _describe_reflection_v1() -> None:
    """Adds grpc/reflection/v1/reflection.proto to the default descriptor pool, made from v1alpha's: the two differ in
    their package only (same messages, same field numbers), so reflection can describe itself under both names."""
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old, new = f".{file.package}.", ".grpc.reflection.v1."
    file.name, file.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    file.ClearField("options")
    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old, new)
    for method in file.service[0].method:
        method.input_type = method.input_type.replace(old, new)
        method.output_type = method.output_type.replace(old, new)
    descriptor_pool.Default().AddSerializedFile(file.SerializeToString())


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Server reflection as grpc.reflection.v1 and v1alpha. grpcio-reflection implements v1alpha only (grpc/grpc#38576);
    v1 is the same protocol under another package, so one servicer answers both names with v1alpha's message classes,
    which encode the same bytes."""
    _describe_reflection_v1()
    names = [*service_names, reflection.SERVICE_NAME, REFLECTION_V1]
    reflection.enable_server_reflection(names, server)
    servicer = reflection.aio.ReflectionServicer(names)
    info = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    v1 = grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": info})
    server.add_generic_rpc_handlers([v1])


def store_retention(settings: Settings) -> Retention:
    return Retention(
        record_ms=settings.reservation_retention_seconds * 1000,
        task_ms=settings.task_retention_seconds * 1000,
        # Remembered for at least the longest lease plus the window, however late a report comes.
        idempotency_ms=(settings.idempotency_window_seconds + settings.max_lease_seconds) * 1000,
        window_grace_ms=settings.window_grace_seconds * 1000,
        usage_max_len=settings.usage_stream_max_len,
        usage_max_age_ms=settings.usage_stream_max_age_seconds * 1000,
        audit_max_len=settings.audit_stream_max_len,
        audit_max_age_ms=settings.audit_stream_max_age_seconds * 1000,
        notify_max_len=settings.notify_stream_max_len,
        notify_max_age_ms=settings.notify_stream_max_age_seconds * 1000,
        notify_fractions_bp=settings.notify_fractions_bp,
    )


def pending_call_limits(max_pending: int) -> list[tuple[str, int]]:
    """gRPC's bound on calls received but not yet taken by a handler: from ``max_pending`` on, a new call is refused
    (CANCELLED) with a probability rising to 1 at twice as many (its random early detection). Offered more than its
    CPU serves, the sidecar's queue is there (bench/overload.py); gRPC's default (1000, 3000) holds seconds of it."""
    if not max_pending:
        return []
    return [
        ("grpc.server.max_pending_requests", max_pending),
        ("grpc.server.max_pending_requests_hard_limit", 2 * max_pending),
    ]


def stream_limits(max_streams: int) -> list[tuple[str, int]]:
    """HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS, which gRPC's C core enforces per connection before any Python runs:
    a client with this many calls open on a connection holds its next ones back (gRPC clients queue them) rather than
    sending them, so one connection's excess costs the sidecar no CPU and connections share it by turns."""
    return [("grpc.max_concurrent_streams", max_streams)] if max_streams else []


def _socket_timeout(settings: Settings) -> float:
    """Twice the longest store deadline: the limiter's deadlines decide first, this only catches what they miss."""
    return 2 * max(settings.check_deadline_ms, settings.store_deadline_ms) / 1000


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or a wildcard: it may be reached from outside


def listener_tls(settings: Settings, addresses: Sequence[str | None]) -> Callable[[], grpc.ServerCredentials] | None:
    """A maker of each listener's credentials: grpc hands a fetcher's first configuration to one port only, and
    each listener keeps its own view of the files."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        for address in addresses:
            if address is not None and not _is_loopback(address):
                log.warning(
                    "listening beyond loopback without TLS: set tls_cert_file and tls_key_file",
                    extra={"address": address},
                )
        return None
    files = (settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    try:
        ReloadingServerCredentials(*files)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise OSError(f"tls_cert_file / tls_key_file / tls_client_ca_file do not load: {exc}") from None
    return lambda: ReloadingServerCredentials(*files).credentials()


class Sidecar:
    """One running sidecar. ``start`` returns once the port serves; ``stop`` drains in-flight calls first."""

    def __init__(self, settings: Settings, *, clock: Clock = wall_clock_ms) -> None:
        self.settings = settings
        self.clock = clock  # epoch milliseconds: windows, leases, gauges (tests pin it)
        self.policy = load_policy(settings.policy_file) if settings.policy_file else default_policy()
        self.embedded: EmbeddedRedis | None = None
        self.redis: AnyRedis | None = None
        self.servicer: BudgetServicer | None = None
        self.server: grpc.aio.Server | None = None
        self.admin_server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.admin_port = 0
        self._watch: asyncio.Task[None] | None = None
        self._policy_stamp = self._stamp()
        self.telemetry = Telemetry(None)
        self._gauges: GaugeReader | None = None
        self.limiter: Limiter | None = None
        self.allowances: Allowances | None = None
        self._allowance_sweep: asyncio.Task[None] | None = None
        self._busy_watch: asyncio.Task[None] | None = None
        self._store_watch: asyncio.Task[None] | None = None
        self._ping_redis: AnyRedis | None = None
        self._lean: LeanScripts | None = None
        self._ready: bool | None = None

    def current_policy(self) -> LoadedPolicy:
        return self.policy

    def _stamp(self) -> tuple[int, int] | None:
        path = self.settings.policy_file
        if path is None:
            return None
        try:
            stat = path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def reload_policy(self) -> bool:
        """Load the policy file again. A bad file is rejected (file, line, field) and the running policy stays."""
        path = self.settings.policy_file
        if path is None:
            return False
        self._policy_stamp = self._stamp()
        try:
            loaded = load_policy(path)
        except PolicyError as exc:
            log.error(
                "policy file rejected; the running policy stays in force",
                extra={"problems": [f"{exc.source}:{p}" for p in exc.problems], "policy_version": self.policy.version},
            )
            self.telemetry.policy_reload("rejected")
            return False
        if loaded.version != self.policy.version:
            self.policy = loaded
            log.info("policy reloaded", extra={"policy": loaded.source, "policy_version": loaded.version})
            self.telemetry.policy_reload("applied")
        return True

    async def _watch_policy(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self._stamp() != self._policy_stamp:
                self.reload_policy()

    async def start(self) -> None:
        settings = self.settings
        tls = self._listener_tls()  # before anything starts: a bad certificate is one line, not a half-started sidecar
        from ._admin_listener import admin_access, admin_server  # it builds on this module's helpers

        access_file = admin_access(settings, settings.admin_listen)  # likewise: an open admin listener is refused
        url = settings.redis_url
        if url is None:
            appendfsync = "everysec" if settings.durability == "none" else "always"
            embedded = EmbeddedRedis(settings.data_dir, appendfsync=appendfsync)
            # Started from this thread, not a worker: the child's die-with-parent signal is tied to the thread that
            # spawned it, and this one lives as long as the sidecar.
            url = embedded.start()
            self.embedded = embedded
            log.info(
                "embedded Redis-compatible server started",
                extra={"url": url, "pid": embedded.pid, "appendfsync": appendfsync},
            )
        self.redis, access = await connect_store(
            settings, url, embedded=self.embedded is not None, socket_timeout=_socket_timeout(settings)
        )
        self.telemetry = telemetry_from_env(
            metrics_port=settings.metrics_port,
            metrics_host=settings.metrics_host,
            label_keys=[key.strip() for key in settings.metric_labels.split(",") if key.strip()],
            max_tenants=settings.metric_max_tenants,
            max_task_types=settings.metric_max_task_types,
            tenant_gauges=settings.metrics_tenant_gauges,
        )
        await self.telemetry.start()
        if self.telemetry.enabled and settings.metrics_tenant_gauges:
            self._gauges = GaugeReader.from_url(
                url, cluster=settings.redis_cluster, timeout_s=_socket_timeout(settings), **access
            )
            self.telemetry.set_gauge_source(self._read_gauges)
        self._lean = lean_scripts(
            settings, self.redis, embedded=self.embedded is not None, socket_timeout=_socket_timeout(settings)
        )
        store = BudgetStore(self.redis, store_retention(settings), self.telemetry, lean=self._lean)
        if settings.local_allowance:
            self.allowances = Allowances(
                AllowanceStore(store),
                AllowanceSettings(
                    cap_tokens=settings.local_allowance_cap_tokens,
                    share_bp=round(settings.local_allowance_share * 10_000),
                    idle_ms=settings.local_allowance_idle_ms,
                ),
            )
            self._allowance_sweep = asyncio.create_task(self._sweep_allowances(settings.local_allowance_idle_ms))
        self.limiter = limiter = Limiter(
            store,
            self.current_policy,
            fail_mode=settings.fail_mode,
            check_deadline_s=settings.check_deadline_ms / 1000,
            store_deadline_s=settings.store_deadline_ms / 1000,
            default_lease_s=settings.default_lease_seconds,
            clock=self.clock,
            telemetry=self.telemetry,
            allowances=self.allowances,
            batch_unary=settings.batch_unary_checks,
        )
        servicer = BudgetServicer(
            limiter,
            max_lease_seconds=settings.max_lease_seconds,
            bound_tenant=settings.tenant or None,
            default_task_type=settings.default_task_type or None,
            deadline_margin_s=settings.deadline_margin_ms / 1000,
            admission=Admission(
                settings.max_checks_in_flight,
                1.0 if settings.tenant else settings.tenant_in_flight_share,
                overload_busy=0.0 if settings.tenant else settings.overload_busy_share,
            ),
        )
        self.servicer = servicer
        if servicer.admission.bounded and servicer.admission.overload_busy:
            self._busy_watch = asyncio.create_task(servicer.admission.watch_loop())
        server = grpc.aio.server(
            options=[
                *_SERVER_OPTIONS,
                *pending_call_limits(settings.max_pending_calls),
                *stream_limits(settings.max_streams_per_connection),
            ]
        )
        server.add_generic_rpc_handlers([servicer.handler()])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        enable_reflection(server, [BUDGET_SERVICE_NAME, health.SERVICE_NAME])
        self.port = self._bind(server, settings.listen, tls)
        await server.start()
        self.server = server
        if settings.health_listen:
            # Kubelet probes reach the pod IP, not loopback: health gets its own listener, the budget API stays local.
            health_only = grpc.aio.server(options=_SERVER_OPTIONS)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, health_only)
            self._bind(health_only, settings.health_listen)
            await health_only.start()
            self.health_server = health_only
        if settings.admin_listen:
            admin = admin_server(limiter, settings, access_file, None)
            self.admin_port = self._bind(admin, settings.admin_listen, tls)
            await admin.start()
            self.admin_server = admin
        if settings.policy_file is not None and settings.policy_reload_seconds > 0:
            self._watch = asyncio.create_task(self._watch_policy(settings.policy_reload_seconds))
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        self._ping_redis = ping_client(
            url, cluster=settings.redis_cluster, timeout_s=settings.store_ping_timeout_ms / 1000, access=access
        )
        await self._set_ready(await self._store_answers())
        if self._ready and self.embedded is None:  # the embedded server is set up as it should be
            advice = listpack_advice(await listpack_limit(self._ping_redis))
            if advice is not None:
                log.warning(advice)
        self._store_watch = asyncio.create_task(self._watch_store())
        log.info(
            "serving",
            extra={
                "listen": settings.listen,
                "port": self.port,
                "policy": self.policy.source,
                "policy_version": self.policy.version,
            },
        )

    async def _sweep_allowances(self, idle_ms: int) -> None:
        """Settle the steps granted from local slices, renew busy ones and hand back idle ones, twice per idle time."""
        while True:
            await asyncio.sleep(idle_ms / 2000)
            if self.allowances is not None:
                try:
                    await self.allowances.sweep(self.clock())
                except Exception:  # never let the timer die: the next round tries again
                    log.exception("allowance sweep failed")
                raise_if_cancelled()

    async def _watch_store(self) -> None:
        """Readiness follows the store: a cheap PING every interval. A dead embedded server is started again."""
        while True:
            await asyncio.sleep(self.settings.store_ping_interval_seconds)
            try:
                if self.embedded is not None and self.embedded.exit_code is not None:
                    await self._set_ready(False)
                    await self._restart_embedded(self.embedded)
                await self._set_ready(await self._store_answers())
            except Exception:  # never let one bad round end the watch: nothing would restart the server after it
                log.exception("store watch failed; trying again")
            raise_if_cancelled()

    async def _store_answers(self) -> bool:
        client = self._ping_redis
        if client is None:
            return False
        try:
            # The client's socket timeouts bound the PING; this bounds a cluster client's node discovery too.
            async with asyncio.timeout(2 * self.settings.store_ping_timeout_ms / 1000):
                return bool(await client.ping())
        except (redis.RedisError, OSError, TimeoutError):
            return False

    async def _set_ready(self, ready: bool) -> None:
        if ready == self._ready:
            return
        if ready:
            log.info("the store answers: ready (health SERVING)")
        else:
            log.warning("the store does not answer: not ready (health NOT_SERVING); checks get the fail mode")
        self._ready = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in READINESS:
            await self.health.set(name, status)

    async def _restart_embedded(self, embedded: EmbeddedRedis) -> None:
        """Start the crashed server again from its append-only file (same data dir, same socket or port), with
        backoff, until it answers. Spawned from this thread, the loop's, which lives as long as the sidecar: the
        child's die-with-parent signal is tied to the thread that spawns it."""
        delay = RESTART_FIRST_DELAY_S
        for attempt in itertools.count(1):
            log.error(
                "embedded server exited; restarting it from its append-only file",
                extra={"exit_code": embedded.exit_code, "pid": embedded.pid, "attempt": attempt},
            )
            try:
                embedded.spawn()
                await asyncio.to_thread(embedded.wait_ready, RESTART_READY_TIMEOUT_S)
            except OSError as exc:  # EmbeddedError, or the binary cannot be run
                log.error("embedded server restart failed", extra={"error": str(exc), "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(2 * delay, RESTART_MAX_DELAY_S)
                continue
            log.info("embedded server restarted", extra={"pid": embedded.pid, "attempt": attempt})
            return

    def _read_gauges(self, tenants: Sequence[str]) -> Iterator[tuple[str, int, dict[str, int]]]:
        """Live reservations and tokens left per window, for the observable gauges (runs on the reader thread)."""
        reader = self._gauges
        if reader is None:
            return
        now = self.clock()
        policy = self.policy.policy
        planner = Planner()
        for tenant_id in tenants:
            tenant = policy.tenant(tenant_id) or policy.default_tenant
            active, remaining = reader.read(tenant_id, planner.window_scopes(tenant, now), now)
            yield tenant_id, active, remaining

    def _listener_tls(self) -> Callable[[], grpc.ServerCredentials] | None:
        return listener_tls(self.settings, (self.settings.listen, self.settings.admin_listen))

    @staticmethod
    def _bind(server: grpc.aio.Server, address: str, tls: Callable[[], grpc.ServerCredentials] | None = None) -> int:
        try:
            port = server.add_insecure_port(address) if tls is None else server.add_secure_port(address, tls())
        except RuntimeError:  # grpcio raises a bare RuntimeError for an address in use or malformed
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {address}: the address is in use or not a valid host:port")
        return port

    async def stop(self) -> None:
        """Stop accepting calls, let in-flight ones finish within the grace period, then release Redis. Every step is
        bounded: one that overruns is logged with where it hangs and left behind, so SIGTERM always ends the process
        (Kubernetes would kill it anyway, without stopping the embedded server or flushing the last metrics)."""
        started = self.embedded is not None or self.server is not None
        grace = self.settings.shutdown_grace_seconds
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._store_watch is not None:
            self._store_watch.cancel()
            await _bounded_step("store watch", self._store_watch, STOP_STEP_LIMIT_S)
            self._store_watch = None
        if self.admin_server is not None:
            await _bounded_step("admin server", self.admin_server.stop(grace), grace + STOP_STEP_LIMIT_S)
            self.admin_server = None
        if self.health_server is not None:
            await self.health.enter_graceful_shutdown()
            await _bounded_step("health server", self.health_server.stop(0), STOP_STEP_LIMIT_S)
            self.health_server = None
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await _bounded_step("budget server", self.server.stop(grace), grace + STOP_STEP_LIMIT_S)
            self.server = None
        if self._busy_watch is not None:
            self._busy_watch.cancel()
            await _bounded_step("event-loop watch", self._busy_watch, STOP_STEP_LIMIT_S)
            self._busy_watch = None
        if self._allowance_sweep is not None:
            self._allowance_sweep.cancel()
            await _bounded_step("allowance sweep", self._allowance_sweep, STOP_STEP_LIMIT_S)
            self._allowance_sweep = None
        if self.allowances is not None:
            # Steps granted locally get their reservations, and the unused slices go back, before Redis is let go.
            await _bounded_step("allowance hand-back", self.allowances.close(self.clock()), STOP_STEP_LIMIT_S)
            self.allowances = None
        if self.limiter is not None:
            # A huge prompt still being counted is not waited for: nobody is left to answer.
            self.limiter.counting_pool.shutdown()
            self.limiter = None
        if self._lean is not None:
            await self._lean.aclose()
            self._lean = None
        if self.redis is not None:
            await _bounded_step("redis client", close_client(self.redis), STOP_STEP_LIMIT_S)
            self.redis = None
        if self._ping_redis is not None:
            await _bounded_step("redis ping client", close_client(self._ping_redis), STOP_STEP_LIMIT_S)
            self._ping_redis = None
        await self.telemetry.aclose()
        if self._gauges is not None:
            self._gauges.close()
            self._gauges = None
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
            self.embedded = None
        if started:  # a start that failed before it ran anything says so in one line, not two
            log.info("stopped")


async def _bounded_step(name: str, step: Awaitable[object], limit_s: float) -> None:
    """Wait for one step of the shutdown for at most ``limit_s``; past that, log where it hangs and go on."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=limit_s)
    if not done:
        where = io.StringIO()
        task.print_stack(file=where)
        details = {"step": name, "limit_s": limit_s, "at": where.getvalue()}
        log.error("shutdown step overran; going on without it", extra=details)
        task.cancel()
        return
    if not task.cancelled() and task.exception() is not None:
        log.error("shutdown step failed", extra={"step": name, "error": repr(task.exception())})


async def serve(settings: Settings, on_ready: Callable[[Sidecar], None] | None = None) -> None:
    sidecar = Sidecar(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, sidecar.reload_policy)
    try:
        await sidecar.start()
        if on_ready is not None:
            on_ready(sidecar)
        await stopping.wait()
        log.info("shutting down")
    finally:
        await sidecar.stop()
