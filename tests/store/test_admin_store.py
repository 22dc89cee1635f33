"""The store's side of the admin API (issue 14), against the real Valkey: audit streams are trimmed to their length
and age, the age by Redis's own clock (the one stream ids are made of)."""

from __future__ import annotations

import asyncio
import json
import time

from redis.asyncio import Redis

from budgetwarden.store import BudgetStore, Retention, TenantKeys, read_audit
from budgetwarden.store._keys import GLOBAL_AUDIT_KEY


async def outcomes(client: Redis, stream: str) -> list[str]:
    return [fields[b"outcome"].decode() for _, fields in await client.xrange(stream)]


async def test_an_audit_stream_keeps_at_most_its_length(async_redis: Redis) -> None:
    store = BudgetStore(async_redis, Retention(audit_max_len=3))
    for n in range(5):
        await store.append_audit("acme", {"entry": json.dumps({"n": n}), "outcome": f"REFUSED-{n}"})
    assert await outcomes(async_redis, TenantKeys("acme").audit) == ["REFUSED-2", "REFUSED-3", "REFUSED-4"]


async def test_audit_entries_past_their_age_are_trimmed_by_the_redis_clock(async_redis: Redis) -> None:
    store = BudgetStore(async_redis, Retention(audit_max_age_ms=50))
    await store.append_audit(None, {"entry": "{}", "outcome": "OLD"})
    ((first_id, _),) = await async_redis.xrange(GLOBAL_AUDIT_KEY)
    first_ms = int(first_id.split(b"-")[0])
    deadline = time.monotonic() + 30
    while True:  # until Redis's clock is well past the first entry's age (not a fixed sleep)
        seconds, micros = await async_redis.time()
        if seconds * 1000 + micros // 1000 > first_ms + 200:
            break
        assert time.monotonic() < deadline, "Redis's clock did not move"
        await asyncio.sleep(0.02)
    await store.append_audit(None, {"entry": "{}", "outcome": "NEW"})
    assert await outcomes(async_redis, GLOBAL_AUDIT_KEY) == ["NEW"]  # the newest entry is never its own victim


def test_an_export_reads_every_tenant_and_the_global_stream_in_time_order(sync_redis: object) -> None:
    import redis

    assert isinstance(sync_redis, redis.Redis)
    written = ((TenantKeys("b").audit, "FIRST"), (GLOBAL_AUDIT_KEY, "SECOND"), (TenantKeys("a").audit, "THIRD"))
    for n, (stream, outcome) in enumerate(written, 1):
        sync_redis.xadd(stream, {"entry": json.dumps({"rpc": "X"}), "outcome": outcome}, id=f"{n * 1000}-0")
    assert [r["outcome"] for r in read_audit(sync_redis, None, 0)] == ["FIRST", "SECOND", "THIRD"]
    assert [r["outcome"] for r in read_audit(sync_redis, "a", 0)] == ["THIRD"]
    assert [r["outcome"] for r in read_audit(sync_redis, None, 1500, 2500)] == ["SECOND"]
