"""Assembles the sidecar: store, limiter, gRPC server with health and reflection, signals, embedded Redis."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from budgetwarden._config import Settings
from budgetwarden._embedded import EmbeddedRedis
from budgetwarden._limiter import Limiter
from budgetwarden._policy import LoadedPolicy, default_policy, load_policy
from budgetwarden._service import SERVICE_NAME, BudgetServicer
from budgetwarden._store import AnyRedis, BudgetStore, Retention

log = logging.getLogger("budgetwarden.server")


def redis_client(url: str, *, cluster: bool) -> AnyRedis:
    if cluster:
        return RedisCluster.from_url(url)
    return Redis.from_url(url)


class Sidecar:
    """One running sidecar. ``start`` returns once the port serves; ``stop`` drains in-flight calls first."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.policy = load_policy(settings.policy_file) if settings.policy_file else default_policy()
        self.embedded: EmbeddedRedis | None = None
        self.redis: AnyRedis | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0

    def current_policy(self) -> LoadedPolicy:
        return self.policy

    async def start(self) -> None:
        settings = self.settings
        url = settings.redis_url
        if url is None:
            self.embedded = EmbeddedRedis(settings.data_dir)
            url = await asyncio.to_thread(self.embedded.start)
            log.info("embedded Redis-compatible server started", extra={"url": url, "pid": self.embedded.pid})
        self.redis = redis_client(url, cluster=settings.redis_cluster)
        retention = Retention(
            record_ms=settings.reservation_retention_seconds * 1000,
            task_ms=settings.task_retention_seconds * 1000,
            idempotency_ms=settings.idempotency_window_seconds * 1000,
            window_grace_ms=settings.window_grace_seconds * 1000,
        )
        limiter = Limiter(
            BudgetStore(self.redis, retention),
            self.current_policy,
            fail_mode=settings.fail_mode,
            check_deadline_s=settings.check_deadline_ms / 1000,
            default_lease_s=settings.default_lease_seconds,
        )
        servicer = BudgetServicer(limiter, max_lease_seconds=settings.max_lease_seconds)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([servicer.handler()])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        try:
            self.port = server.add_insecure_port(settings.listen)
        except RuntimeError:  # grpcio raises a bare RuntimeError for an address in use or malformed
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.listen}: the address is in use or not a valid host:port")
        await server.start()
        self.server = server
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

    async def stop(self) -> None:
        """Stop accepting calls, let in-flight ones finish within the grace period, then release Redis."""
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(self.settings.shutdown_grace_seconds)
            self.server = None
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None
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
    try:
        await sidecar.start()
        if on_ready is not None:
            on_ready(sidecar)
        await stopping.wait()
        log.info("shutting down")
    finally:
        await sidecar.stop()
