"""What the budget gauges show, read from Redis: live reservations and tokens left per window of a tenant.

The metrics reader calls it on a thread of its own, so it has a synchronous client of its own, with socket timeouts:
a stalled Redis never hangs the reader, and the event loop's client is never shared with a thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from budgetwarden.domain import Scope, remaining_of

from ._keys import TenantKeys
from ._sentinel import is_sentinel_url, parse_sentinel_url, sync_sentinel_master


class GaugeReader:
    __slots__ = ("client",)

    def __init__(self, client: redis.Redis | redis.RedisCluster) -> None:
        self.client = client

    @classmethod
    def from_url(cls, url: str, *, cluster: bool, timeout_s: float, **access: Any) -> GaugeReader:
        """``access``: credentials and TLS options for redis-py, as the sidecar's other clients get them."""
        options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, **access}
        if is_sentinel_url(url):
            return cls(sync_sentinel_master(parse_sentinel_url(url), options))
        kind = redis.RedisCluster if cluster else redis.Redis
        return cls(kind.from_url(url, **options))

    def read(self, tenant_id: str, windows: Sequence[Scope], now_ms: int) -> tuple[int, dict[str, int]]:
        """A tenant's live reservations (leases not lapsed at ``now_ms``) and the tokens left in each of ``windows``
        that has a token limit, by window name (``day``)."""
        keys = TenantKeys(tenant_id)
        active = int(self.client.zcount(keys.leases, f"({now_ms}", "+inf"))
        remaining: dict[str, int] = {}
        for scope in windows:
            if scope.limit is None or scope.span is None:
                continue
            used, reserved = self.client.hmget(keys.window(scope.span), "used", "reserved")
            remaining[scope.span.window.name.lower()] = remaining_of(scope.limit, int(used or 0), int(reserved or 0))
        return active, remaining

    def close(self) -> None:
        self.client.close()
        manager = getattr(getattr(self.client, "connection_pool", None), "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):  # behind Sentinel: the sentinels' connections too
            sentinel.close()
