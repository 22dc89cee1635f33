"""The control plane's notification deliverer, from the settings (docs/operators.md#notifications)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid

from opentelemetry.sdk.metrics import MeterProvider

from budgetwarden.notify import Backoff, Deliverer, targets_of
from budgetwarden.store import AnyRedis, NotificationQueue

from ._config import Settings, split_list


def deliverer_of(settings: Settings, redis: AnyRedis, meter_provider: MeterProvider | None = None) -> Deliverer | None:
    """None when no URL is configured: the events then wait in Redis (bounded) for a control plane that has some."""
    targets = targets_of(split_list(settings.notify_webhook_urls), split_list(settings.notify_slack_urls))
    if not targets:
        return None
    # A consumer name per process: the group hands each event to one of the replicas.
    consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return Deliverer(
        NotificationQueue(redis, consumer),
        targets,
        source=settings.notify_source,
        secret_file=settings.notify_secret_file,
        max_attempts=settings.notify_max_attempts,
        backoff=Backoff(settings.notify_backoff_initial_ms / 1000, settings.notify_backoff_max_ms / 1000),
        timeout_s=settings.notify_timeout_ms / 1000,
        meter_provider=meter_provider,
    )


class Notifications:
    """Runs a deliverer beside the admin server, and stops it (what it holds stays pending in Redis)."""

    def __init__(self, deliverer: Deliverer | None) -> None:
        self.deliverer = deliverer
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.deliverer is not None:
            self._task = asyncio.create_task(self.deliverer.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.deliverer is not None:
            await self.deliverer.aclose()
            self.deliverer = None
