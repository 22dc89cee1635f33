"""The control plane: ``budgetwarden control-plane`` serves BudgetAdminService (with its credentials, TLS, health and
reflection) against the Redis the sidecars use, and no budget API. Sidecars stay the data plane.

It shares the sidecar's pieces: the same settings, Redis client and access options, store retention, listener TLS
and admin server; the policy only names each tenant's windows (GetTenantWindows) and is read again when it changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from budgetwarden.domain import LoadedPolicy, PolicyError, default_policy, load_policy
from budgetwarden.limiter import Clock, Limiter, wall_clock_ms
from budgetwarden.store import AnyRedis, BudgetStore, raise_if_cancelled
from budgetwarden.telemetry import Telemetry, telemetry_from_env
from budgetwarden.transport import ADMIN_SERVICE_NAME

from ._admin_listener import admin_access, admin_server
from ._config import Settings
from ._notify import Notifications, deliverer_of
from ._redis_clients import close_client, connect_store, ping_client
from ._sidecar import (
    STOP_STEP_LIMIT_S,
    Sidecar,
    _bounded_step,
    _socket_timeout,
    listener_tls,
    store_retention,
)

if TYPE_CHECKING:
    from budgetwarden.console import ConsoleServer

log = logging.getLogger("budgetwarden.control_plane")

DEFAULT_LISTEN = "127.0.0.1:50152"  # the admin address the CLI calls by default
READINESS = ("", ADMIN_SERVICE_NAME)


def redis_url_of(settings: Settings) -> str:
    """The Redis to administer: ``redis_url``, else the socket of the embedded server a local sidecar runs in
    ``data_dir`` (``make demo``, a laptop)."""
    if settings.redis_url is not None:
        return settings.redis_url
    return f"unix://{(Path(settings.data_dir) / 'redis.sock').resolve()}"


class _PolicyFile:
    """The policy, read again when the file's stamp changes (checked at each use: admin calls are few)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp = self._stat()
        self.loaded = load_policy(path) if path is not None else default_policy()

    def _stat(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def __call__(self) -> LoadedPolicy:
        stamp = self._stat()
        if self.path is not None and stamp is not None and stamp != self._stamp:
            self._stamp = stamp
            try:
                self.loaded = load_policy(self.path)
            except PolicyError as exc:
                log.error("policy file rejected; the running policy stays in force", extra={"error": str(exc)})
        return self.loaded


async def start_console(limiter: Limiter, settings: Settings, address: str) -> ConsoleServer:
    """The web console on its own listener: the same tokens file as the admin API (and the same refusal of a listener
    beyond loopback without one), TLS from the same files."""
    # starlette, jinja2 and uvicorn are imported here only: a control plane without a console, and every sidecar,
    # never load them.
    from budgetwarden.console import ConsoleServer, ReloadingContext, console_app, parse_address

    parse_address(address)  # a malformed address is named before anything else
    access = admin_access(settings, address, "console_listen")
    tls = None
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        try:
            tls = ReloadingContext(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
        except (OSError, ValueError) as exc:
            raise OSError(f"tls_cert_file / tls_key_file / tls_client_ca_file do not load: {exc}") from None
    app = console_app(limiter, access, secure_cookies=tls is not None)
    console = ConsoleServer(app, address, tls, grace_s=settings.shutdown_grace_seconds)
    await console.start()
    return console


class ControlPlane:
    def __init__(self, settings: Settings, *, clock: Clock = wall_clock_ms) -> None:
        self.settings = settings
        self.clock = clock
        self.listen = settings.admin_listen or DEFAULT_LISTEN
        self.policy = _PolicyFile(settings.policy_file)
        self.health = health.aio.HealthServicer()
        self.redis: AnyRedis | None = None
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self.port = 0
        self._ping: AnyRedis | None = None
        self._watch: asyncio.Task[None] | None = None
        self._ready: bool | None = None
        self.limiter: Limiter | None = None
        self.console: ConsoleServer | None = None
        self.notifications = Notifications(None)
        self.telemetry = Telemetry(None)

    async def start(self) -> None:
        settings = self.settings
        # Refused before anything starts: an open admin listener, bad TLS files, a bad tokens file.
        access = admin_access(settings, self.listen)
        tls = listener_tls(settings, (self.listen,))
        url = redis_url_of(settings)
        # Without --redis-url it uses a local sidecar's embedded server (its socket in the data dir).
        self.redis, options = await connect_store(
            settings, url, embedded=settings.redis_url is None, socket_timeout=_socket_timeout(settings)
        )
        # Its own metrics (admin calls and their outcomes, notification deliveries), on the same settings as a
        # sidecar's: --metrics-port for a scrape endpoint, OTEL_* for OTLP. No tenant gauges: the sidecars export them.
        self.telemetry = telemetry_from_env(
            metrics_port=settings.metrics_port,
            metrics_host=settings.metrics_host,
            label_keys=(),
            max_tenants=settings.metric_max_tenants,
            max_task_types=settings.metric_max_task_types,
            tenant_gauges=False,
        )
        await self.telemetry.start()
        self.limiter = limiter = Limiter(
            BudgetStore(self.redis, store_retention(settings), self.telemetry),
            self.policy,
            store_deadline_s=settings.store_deadline_ms / 1000,
            clock=self.clock,
            telemetry=self.telemetry,
        )
        server = admin_server(limiter, settings, access, self.health)
        self.port = Sidecar._bind(server, self.listen, tls)
        await server.start()
        self.server = server
        if settings.console_listen:
            self.console = await start_console(limiter, settings, settings.console_listen)
        if settings.health_listen:
            health_only = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, health_only)
            Sidecar._bind(health_only, settings.health_listen)
            await health_only.start()
            self.health_server = health_only
        await self.health.set("liveness", health_pb2.HealthCheckResponse.SERVING)
        self._ping = ping_client(
            url, cluster=settings.redis_cluster, timeout_s=settings.store_ping_timeout_ms / 1000, access=options
        )
        await self._set_ready(await self._store_answers())
        self._watch = asyncio.create_task(self._watch_store())
        self.notifications = Notifications(deliverer_of(settings, self.redis, self.telemetry.provider))
        self.notifications.start()
        log.info(
            "control plane serving",
            extra={"listen": self.listen, "port": self.port, "credentials": access is not None, "tls": tls is not None},
        )

    async def _store_answers(self) -> bool:
        if self._ping is None:
            return False
        try:
            async with asyncio.timeout(2 * self.settings.store_ping_timeout_ms / 1000):
                return bool(await self._ping.ping())
        except (redis.RedisError, OSError, TimeoutError):
            return False

    async def _set_ready(self, ready: bool) -> None:
        if ready == self._ready:
            return
        self._ready = ready
        (log.info if ready else log.warning)("the store answers" if ready else "the store does not answer")
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in READINESS:
            await self.health.set(name, status)

    async def _watch_store(self) -> None:
        while True:
            await asyncio.sleep(self.settings.store_ping_interval_seconds)
            await self._set_ready(await self._store_answers())
            raise_if_cancelled()

    async def stop(self) -> None:
        grace = self.settings.shutdown_grace_seconds
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self.console is not None:
            await _bounded_step("console", self.console.stop(), grace + STOP_STEP_LIMIT_S)
            self.console = None
        await _bounded_step("notifications", self.notifications.stop(), STOP_STEP_LIMIT_S)
        if self.health_server is not None:
            await _bounded_step("health server", self.health_server.stop(0), STOP_STEP_LIMIT_S)
            self.health_server = None
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await _bounded_step("admin server", self.server.stop(grace), grace + STOP_STEP_LIMIT_S)
            self.server = None
        if self.limiter is not None:
            self.limiter.counting_pool.shutdown()  # never used here (no checks), but it is the limiter's to close
            self.limiter = None
        for client in (self.redis, self._ping):
            if client is not None:
                await _bounded_step("redis client", close_client(client), STOP_STEP_LIMIT_S)
        self.redis = self._ping = None
        await _bounded_step("metrics", self.telemetry.aclose(), STOP_STEP_LIMIT_S)


async def serve_control_plane(settings: Settings, on_ready: Callable[[ControlPlane], None] | None = None) -> None:
    plane = ControlPlane(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await plane.start()
        if on_ready is not None:
            on_ready(plane)
        await stopping.wait()
        log.info("shutting down")
    finally:
        await plane.stop()
