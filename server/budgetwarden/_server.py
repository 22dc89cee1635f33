"""Assembles the sidecar: store, limiter, gRPC server with health and reflection, signals, embedded Redis."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterator, Sequence

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from budgetwarden._admin import SERVICE_NAME as ADMIN_SERVICE_NAME
from budgetwarden._admin import AdminServicer
from budgetwarden._config import Settings
from budgetwarden._decision import Planner
from budgetwarden._embedded import EmbeddedRedis
from budgetwarden._keys import TenantKeys
from budgetwarden._limiter import Clock, Limiter, wall_clock_ms
from budgetwarden._policy import LoadedPolicy, PolicyError, default_policy, load_policy
from budgetwarden._service import SERVICE_NAME, BudgetServicer
from budgetwarden._store import AnyRedis, BudgetStore, Retention
from budgetwarden._telemetry import Telemetry, telemetry_from_env

log = logging.getLogger("budgetwarden.server")

# gRPC shares a port between processes by default (SO_REUSEPORT): a second sidecar on a taken port would quietly take
# half the calls, perhaps with another policy or store. Off, it fails to start with "address in use" instead.
_SERVER_OPTIONS = [("grpc.so_reuseport", 0)]


def redis_client(url: str, *, cluster: bool) -> AnyRedis:
    """One retry on a dropped connection: after Redis restarts, every pooled connection is dead once. Every script the
    sidecar runs is idempotent (reservations, report markers, release states, decided checkpoints), so a retry after a
    drop is safe — except adding to a ceiling through the admin API, which could then apply twice."""
    if cluster:
        return RedisCluster.from_url(url, retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])
    return Redis.from_url(url, retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])


class Sidecar:
    """One running sidecar. ``start`` returns once the port serves; ``stop`` drains in-flight calls first."""

    def __init__(self, settings: Settings, *, clock: Clock = wall_clock_ms) -> None:
        self.settings = settings
        self.clock = clock  # epoch milliseconds: windows, leases, gauges (tests pin it)
        self.policy = load_policy(settings.policy_file) if settings.policy_file else default_policy()
        self.embedded: EmbeddedRedis | None = None
        self.redis: AnyRedis | None = None
        self.server: grpc.aio.Server | None = None
        self.admin_server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.admin_port = 0
        self._watch: asyncio.Task[None] | None = None
        self._policy_stamp = self._stamp()
        self.telemetry = Telemetry(None)
        self._gauge_redis: redis.Redis | redis.RedisCluster | None = None

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
        url = settings.redis_url
        if url is None:
            self.embedded = EmbeddedRedis(settings.data_dir)
            # Started from this thread, not a worker: the child's die-with-parent signal is tied to the thread that
            # spawned it, and this one lives as long as the sidecar.
            url = self.embedded.start()
            log.info("embedded Redis-compatible server started", extra={"url": url, "pid": self.embedded.pid})
        self.redis = redis_client(url, cluster=settings.redis_cluster)
        self.telemetry = telemetry_from_env(
            metrics_port=settings.metrics_port,
            metrics_host=settings.metrics_host,
            label_keys=[key.strip() for key in settings.metric_labels.split(",") if key.strip()],
            max_tenants=settings.metric_max_tenants,
            max_task_types=settings.metric_max_task_types,
        )
        if self.telemetry.enabled:
            sync = redis.RedisCluster.from_url(url) if settings.redis_cluster else redis.Redis.from_url(url)
            self._gauge_redis = sync
            self.telemetry.set_gauge_source(self._read_gauges)
        retention = Retention(
            record_ms=settings.reservation_retention_seconds * 1000,
            task_ms=settings.task_retention_seconds * 1000,
            # Remembered for at least the longest lease plus the window, however late a report comes.
            idempotency_ms=(settings.idempotency_window_seconds + settings.max_lease_seconds) * 1000,
            window_grace_ms=settings.window_grace_seconds * 1000,
            usage_max_len=settings.usage_stream_max_len,
            usage_max_age_ms=settings.usage_stream_max_age_seconds * 1000,
        )
        limiter = Limiter(
            BudgetStore(self.redis, retention, self.telemetry),
            self.current_policy,
            fail_mode=settings.fail_mode,
            check_deadline_s=settings.check_deadline_ms / 1000,
            default_lease_s=settings.default_lease_seconds,
            clock=self.clock,
            telemetry=self.telemetry,
        )
        servicer = BudgetServicer(
            limiter,
            max_lease_seconds=settings.max_lease_seconds,
            bound_tenant=settings.tenant or None,
            default_task_type=settings.default_task_type or None,
        )
        server = grpc.aio.server(options=_SERVER_OPTIONS)
        server.add_generic_rpc_handlers([servicer.handler()])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        self.port = self._bind(server, settings.listen)
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
            admin = grpc.aio.server(options=_SERVER_OPTIONS)
            admin.add_generic_rpc_handlers([AdminServicer(limiter).handler()])
            reflection.enable_server_reflection([ADMIN_SERVICE_NAME, reflection.SERVICE_NAME], admin)
            self.admin_port = self._bind(admin, settings.admin_listen)
            await admin.start()
            self.admin_server = admin
        if settings.policy_file is not None and settings.policy_reload_seconds > 0:
            self._watch = asyncio.create_task(self._watch_policy(settings.policy_reload_seconds))
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            extra={
                "listen": settings.listen,
                "port": self.port,
                "policy": self.policy.source,
                "policy_version": self.policy.version,
            },
        )

    def _read_gauges(self, tenants: Sequence[str]) -> Iterator[tuple[str, int, dict[str, int]]]:
        """Live reservations and tokens left per window, for the observable gauges (runs on the reader thread)."""
        client = self._gauge_redis
        if client is None:
            return
        now = self.clock()
        policy = self.policy.policy
        planner = Planner()
        for tenant_id in tenants:
            keys = TenantKeys(tenant_id)
            active = int(client.zcount(keys.leases, f"({now}", "+inf"))
            remaining: dict[str, int] = {}
            tenant = policy.tenant(tenant_id) or policy.default_tenant
            for scope in planner.window_scopes(tenant, now):
                if scope.limit is None or scope.span is None:
                    continue
                used, reserved = client.hmget(keys.window(scope.span), "used", "reserved")
                left = scope.limit - int(used or 0) - int(reserved or 0)
                remaining[scope.span.window.name.lower()] = max(0, left)
            yield tenant_id, active, remaining

    @staticmethod
    def _bind(server: grpc.aio.Server, address: str) -> int:
        try:
            port = server.add_insecure_port(address)
        except RuntimeError:  # grpcio raises a bare RuntimeError for an address in use or malformed
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {address}: the address is in use or not a valid host:port")
        return port

    async def stop(self) -> None:
        """Stop accepting calls, let in-flight ones finish within the grace period, then release Redis."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self.admin_server is not None:
            await self.admin_server.stop(self.settings.shutdown_grace_seconds)
            self.admin_server = None
        if self.health_server is not None:
            await self.health.enter_graceful_shutdown()
            await self.health_server.stop(0)
            self.health_server = None
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(self.settings.shutdown_grace_seconds)
            self.server = None
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None
        await asyncio.to_thread(self.telemetry.shutdown)
        if self._gauge_redis is not None:
            self._gauge_redis.close()
            self._gauge_redis = None
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
            self.embedded = None
        log.info("stopped")


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
