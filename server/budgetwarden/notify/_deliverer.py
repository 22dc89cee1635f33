"""The deliverer: the control plane reads the tenants' notification streams through a consumer group (each event
goes to one replica), POSTs each event to every target with retries and exponential backoff, then acknowledges and
deletes it. At least once: an event whose replica dies before acknowledging it is claimed by another after
``claim_idle_ms`` and sent again (with the same CloudEvent id)."""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import redis
from opentelemetry import metrics
from opentelemetry.metrics import MeterProvider

from budgetwarden.store import NotificationEntry, NotificationQueue, raise_if_cancelled

from ._events import body_of, cloud_event, event_id, read_secret, sign, slack_text

log = logging.getLogger("budgetwarden.notify")


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    slack: bool = False  # a Slack-compatible incoming webhook: {"text": ...}, unsigned

    @property
    def host(self) -> str:
        """What a log line names: a webhook URL may hold a secret in its path (Slack's do)."""
        return urlsplit(self.url).netloc


def targets_of(webhook_urls: Sequence[str], slack_urls: Sequence[str]) -> list[Target]:
    return [Target(url) for url in webhook_urls] + [Target(url, slack=True) for url in slack_urls]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential: ``initial_s`` before the first retry, doubled for each next, at most ``max_s``; with jitter, a
    wait is drawn from its upper half, so that replicas retrying together spread out."""

    initial_s: float
    max_s: float
    jitter: bool = True

    def delay(self, retry: int) -> float:
        wait = min(self.max_s, self.initial_s * 2 ** (retry - 1))
        return float(wait * random.uniform(0.5, 1.0)) if self.jitter else float(wait)

    def total(self, retries: int) -> float:
        """The longest all ``retries`` waits can take together."""
        return float(sum(min(self.max_s, self.initial_s * 2 ** (n - 1)) for n in range(1, retries + 1)))


# Statuses worth trying again: the receiver may answer differently later. Any other 4xx is the request's fault.
_RETRIED_4XX = frozenset({408, 409, 425, 429})


class Deliverer:
    def __init__(
        self,
        queue: NotificationQueue,
        targets: Sequence[Target],
        *,
        source: str,
        secret_file: Path | None,
        max_attempts: int,
        backoff: Backoff,
        timeout_s: float,
        in_flight: int = 64,
        poll_interval_s: float = 0.5,
        rescan_interval_s: float = 5.0,
        claim_idle_ms: int | None = None,
        meter_provider: MeterProvider | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock_s: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.targets = list(targets)
        self.source = source
        self.secret_file = secret_file
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.in_flight = in_flight
        self.poll_interval_s = poll_interval_s
        self.rescan_interval_s = rescan_interval_s
        # An event is claimed from its consumer only once that one could no longer be trying it.
        longest = backoff.total(max_attempts - 1) + max_attempts * timeout_s
        self.claim_idle_ms = claim_idle_ms if claim_idle_ms is not None else int((longest + 60) * 1000)
        self.sleep = sleep
        self.clock_s = clock_s
        self.counts: collections.Counter[str] = collections.Counter()
        self._client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._streams: list[str] = []
        self._next_scan = 0.0
        meter = (meter_provider or metrics.get_meter_provider()).get_meter("budgetwarden.notify")
        self._delivered = meter.create_counter("budgetwarden.notify.delivered", "{event}", "Notifications delivered")
        self._retried = meter.create_counter("budgetwarden.notify.retries", "{try}", "Notification deliveries retried")
        self._dropped = meter.create_counter(
            "budgetwarden.notify.dropped",
            "{event}",
            "Notifications not delivered: the tenant's stream was full (queue_full) or every try failed "
            "(retries_exhausted)",
        )

    # --- reading --------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll until cancelled; a Redis that does not answer is logged and tried again at the next poll."""
        while True:
            try:
                await self.poll()
            except (redis.RedisError, OSError) as exc:
                log.warning("cannot read the notification streams", extra={"error": repr(exc)})
            raise_if_cancelled()
            await asyncio.sleep(self.poll_interval_s)

    async def poll(self) -> int:
        """One round: find the streams now and then (and take their dropped counts), claim what dead replicas left,
        read what is new; start delivering each event taken. Returns how many were taken."""
        rescan = time.monotonic() >= self._next_scan
        if rescan:
            self._streams = await self.queue.streams()
            self._next_scan = time.monotonic() + self.rescan_interval_s
            for stream in self._streams:
                await self._count_dropped(stream)
        taken = 0
        for stream in self._streams:
            room = self.in_flight - len(self._tasks)
            if room <= 0:
                break
            entries = await self.queue.claim(stream, self.claim_idle_ms, room) if rescan else []
            entries += await self.queue.read(stream, room - len(entries)) if room > len(entries) else []
            for entry in entries:
                key = (entry.stream, entry.entry_id)
                if key not in self._tasks:  # our own, still being tried
                    self._tasks[key] = asyncio.create_task(self._deliver(entry))
                    taken += 1
        return taken

    async def _count_dropped(self, stream: str) -> None:
        dropped = await self.queue.take_dropped(stream)
        if dropped:
            self.counts["dropped_queue_full"] += dropped
            self._dropped.add(dropped, {"reason": "queue_full"})
            log.warning(
                "notifications dropped: the tenant's notification stream was full (notify_stream_max_len)",
                extra={"stream": stream, "dropped": dropped},
            )

    async def idle(self) -> None:
        """Wait until every event taken so far is delivered or given up (tests; shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def aclose(self) -> None:
        """Stop delivering: what is in hand stays pending in Redis, for this or another replica to claim."""
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self._client.aclose()

    # --- delivering -----------------------------------------------------------------------------------------------

    async def _deliver(self, entry: NotificationEntry) -> None:
        key = (entry.stream, entry.entry_id)
        try:
            await asyncio.gather(*(self._deliver_to(target, entry) for target in self.targets))
            # Not acknowledged when Redis fails here: it stays pending, and is claimed and sent again later.
            await self.queue.done(entry)
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot acknowledge a notification", extra={"error": repr(exc), "id": event_id(entry)})
        except (KeyError, ValueError) as exc:  # not an event this version knows: given up, not retried forever
            log.error("malformed notification dropped", extra={"error": repr(exc), "id": event_id(entry)})
            self.counts["malformed"] += 1
            await self.queue.done(entry)
        finally:
            self._tasks.pop(key, None)

    def _request(self, target: Target, entry: NotificationEntry) -> tuple[bytes, dict[str, str]]:
        if target.slack:
            return body_of({"text": slack_text(entry)}), {"content-type": "application/json"}
        event = cloud_event(entry, self.source)
        body = body_of(event)
        headers = {"content-type": "application/cloudevents+json; charset=utf-8"}
        if self.secret_file is not None:
            # Signed at each try, with its own timestamp: a receiver refuses old ones (replays).
            headers |= sign(read_secret(self.secret_file), event["id"], int(self.clock_s()), body)
        return body, headers

    async def _deliver_to(self, target: Target, entry: NotificationEntry) -> bool:
        reason = ""
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                self.counts["retried"] += 1
                self._retried.add(1)
                await self.sleep(self.backoff.delay(attempt - 1))
            try:
                body, headers = self._request(target, entry)
                response = await self._client.post(target.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                reason = type(exc).__name__
                continue
            except OSError as exc:  # the key's file, unreadable for now (a Secret being replaced): tried again
                reason = f"cannot read notify_secret_file: {exc.strerror or exc!r}"
                continue
            if response.is_success:
                self.counts["delivered"] += 1
                self._delivered.add(1, {"kind": "slack" if target.slack else "webhook"})
                return True
            reason = f"HTTP {response.status_code}"
            if 400 <= response.status_code < 500 and response.status_code not in _RETRIED_4XX:
                break
        self.counts["dropped_retries_exhausted"] += 1
        self._dropped.add(1, {"reason": "retries_exhausted"})
        log.warning(
            "notification given up",
            extra={"id": event_id(entry), "host": target.host, "reason": reason, "attempts": attempt},
        )
        return False
