"""The notification queue: each tenant's events, written by the scripts that open and decide checkpoints and by the
check that sees a window reach a notified fraction (lua/_lib.lua, notify_append), in the stream ``<p>notify``.

The control plane delivers them through one consumer group per stream, so that among its replicas each event goes to
one of them; an event is acknowledged and deleted once delivered (or given up), so a stream's length is what awaits
delivery. A replica that dies with events in hand leaves them pending: another claims them after ``claim_idle_ms``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from redis.exceptions import ResponseError

from ._codec import reply_text
from ._keys import KEY_VERSION, TenantKeys

GROUP = "budgetwarden-notify"
_STREAM_PATTERN = f"{KEY_VERSION}:{{*}}:notify"
# One script, so that an event is never acknowledged yet left in the stream (where it would count against the cap).
_ACK_DELETE = "redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) return redis.call('XDEL', KEYS[1], ARGV[2])"


def notify_stream(tenant_id: str) -> str:
    return TenantKeys(tenant_id).prefix + "notify"


def dropped_counter(tenant_id: str) -> str:
    return TenantKeys(tenant_id).prefix + "notify:dropped"


def tenant_of_stream(stream: str) -> str:
    """The tenant id a stream key belongs to (the tag is the URL-quoted id)."""
    tag = stream[len(KEY_VERSION) + 2 : stream.index("}:")]
    return unquote(tag)


@dataclass(frozen=True, slots=True, kw_only=True)
class NotificationEntry:
    """One stored event: its stream, the entry id (unique within the tenant), the tenant and the script's fields."""

    stream: str
    entry_id: str
    tenant_id: str
    fields: dict[str, str]


def _entries(stream: str, reply: Any) -> list[NotificationEntry]:
    tenant_id = tenant_of_stream(stream)
    out = []
    for entry_id, raw in reply or []:
        if raw is None:  # deleted while pending (never here: entries are deleted only once acknowledged)
            continue
        fields = {reply_text(k): reply_text(v) for k, v in raw.items()}
        out.append(NotificationEntry(stream=stream, entry_id=reply_text(entry_id), tenant_id=tenant_id, fields=fields))
    return out


class NotificationQueue:
    """The control plane's side of the tenant notification streams: find them, read, claim, acknowledge."""

    def __init__(self, redis: Any, consumer: str) -> None:
        self.redis = redis
        self.consumer = consumer
        self._grouped: set[str] = set()
        self._ack_delete = redis.register_script(_ACK_DELETE)

    async def streams(self) -> list[str]:
        """Every tenant's notification stream (a SCAN: done now and then, not per read)."""
        found = {reply_text(key) async for key in self.redis.scan_iter(match=_STREAM_PATTERN, _type="STREAM")}
        return sorted(found)

    async def _ensure_group(self, stream: str) -> bool:
        """The group exists on the stream; False when the stream itself is gone (expired since the scan), which is
        not made again here: a stream made by a reader would have no expiry."""
        if stream in self._grouped:
            return True
        try:
            # From the start: events written before any control plane ran are delivered too.
            await self.redis.xgroup_create(stream, GROUP, id="0")
        except ResponseError as exc:
            if "requires the key to exist" in str(exc):
                return False
            if "BUSYGROUP" not in str(exc):
                raise
        self._grouped.add(stream)
        return True

    async def read(self, stream: str, count: int) -> list[NotificationEntry]:
        """Up to ``count`` events never handed to any consumer, now this one's (pending until acknowledged)."""
        if not await self._ensure_group(stream):
            return []
        try:
            reply = await self.redis.xreadgroup(GROUP, self.consumer, {stream: ">"}, count=count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):  # the stream expired (and may come back): make its group again
                raise
            self._grouped.discard(stream)
            return []
        return [entry for _, entries in reply or [] for entry in _entries(stream, entries)]

    async def claim(self, stream: str, idle_ms: int, count: int) -> list[NotificationEntry]:
        """Events another consumer took and has not acknowledged for ``idle_ms`` (it died, or lost its connection)."""
        if not await self._ensure_group(stream):
            return []
        try:
            reply = await self.redis.xautoclaim(stream, GROUP, self.consumer, idle_ms, "0-0", count=count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._grouped.discard(stream)
            return []
        return _entries(stream, reply[1])

    async def done(self, entry: NotificationEntry) -> None:
        """Acknowledge and delete an event (delivered or given up): the stream keeps only what awaits delivery."""
        await self._ack_delete(keys=[entry.stream], args=[GROUP, entry.entry_id])

    async def take_dropped(self, stream: str) -> int:
        """How many events the tenant's full stream turned away since the last call (taken once, by one replica)."""
        counter = stream + ":dropped"
        value = await self.redis.getdel(counter)
        return int(reply_text(value)) if value is not None else 0
