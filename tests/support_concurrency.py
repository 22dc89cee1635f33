"""What the concurrency tests share: a policy for one tenant, a limiter on a fixed clock, random jobs, and the checks
that the counters and the reservation records in Redis add up (tests/store/test_concurrent_scripts.py in one process,
tests/system/test_concurrency.py across processes)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import redis
from redis.asyncio import Redis as AsyncRedis

from budgetwarden.domain._model import CheckInput, Decision, Reason
from budgetwarden.domain._policy import parse_policy
from budgetwarden.limiter import Limiter
from budgetwarden.store._keys import TenantKeys, reservation_id
from budgetwarden.store._store import BudgetStore

TENANT = "acme"
MAX_STEP = 500
# A fixed clock for the limiter-level tests: the windows cannot roll over while a test runs.
FIXED_NOW_MS = int(datetime(2025, 6, 17, 12, 0, tzinfo=UTC).timestamp() * 1000)

Job = tuple[str, str, int]  # task id, step id, tokens
Row = dict[str, Any]


def policy_text(*, task: int, step: int, day: int, month: int | None = None, time_zone: str = "UTC") -> str:
    month_line = f"\n      month: {{tokens: {month}}}" if month is not None else ""
    return f"""\
version: 1
unknown_tenants: reject
default_model: {{}}  # free: these tests count tokens only
tenants:
  {TENANT}:
    time_zone: {time_zone}
    windows:
      day: {{tokens: {day}}}{month_line}
default_task_type: agent
task_types:
  agent:
    per_task: {{tokens: {task}}}
    per_step: {{tokens: {step}}}
    lease_seconds: 600
min_lease_seconds: 1  # the lapsing-lease races ask for 2 s leases
"""


def make_limiter(client: AsyncRedis, text: str, now_ms: int | Callable[[], int]) -> Limiter:
    loaded = parse_policy(text, "test")
    clock = now_ms if callable(now_ms) else lambda: now_ms
    return Limiter(BudgetStore(client), lambda: loaded, check_deadline_s=60.0, clock=clock, store_deadline_s=30.0)


def check_input(task_id: str, step_id: str, tokens: int) -> CheckInput:
    return CheckInput(
        tenant_id=TENANT,
        task_id=task_id,
        step_id=step_id,
        task_type="",
        model="m",
        input_tokens=tokens,
        output_tokens=0,
        tool_calls=0,
    )


def reservation_records(sync_redis: redis.Redis) -> tuple[set[str], set[str]]:
    """The reservation ids with a record in Redis, and those holding a lease."""
    keys = TenantKeys(TENANT)
    records = {key.decode().removeprefix(keys.resv_prefix) for key in sync_redis.scan_iter(match="*:resv:*")}
    leased = {member.decode() for member in sync_redis.zrange(keys.leases, 0, -1)}
    return records, leased


def random_jobs(task_ids: Sequence[str], count: int, seed: int, prefix: str) -> list[Job]:
    rng = random.Random(seed)
    return [(task_ids[i % len(task_ids)], f"{prefix}-{i}", rng.randint(1, MAX_STEP)) for i in range(count)]


def assert_ceiling_reached(rows: Sequence[Row], ceiling: int, denial: Reason, binding: str) -> int:
    """Total granted fits the ceiling, and every denied step was denied because it did not fit what was left."""
    granted = [row for row in rows if row["decision"] == Decision.ALLOW]
    denied = [row for row in rows if row["decision"] != Decision.ALLOW]
    assert not [row for row in rows if row["fail_mode"]], "no answer may come from the fail mode"
    assert all(row["granted"] == row["tokens"] and not row["replayed"] for row in granted)
    assert all(row["granted"] == 0 and row["rid"] == "" for row in denied)
    total = sum(row["granted"] for row in granted)
    assert total <= ceiling
    assert denied, "demand must exceed the ceiling for this test to mean anything"
    assert {(row["decision"], row["reason"], row["binding"]) for row in denied} == {(Decision.DENY, denial, binding)}
    # Room only shrinks, so every denied step was larger than the room left at the end: within one step of it.
    smallest_denied = min(row["tokens"] for row in denied)
    assert ceiling - total < smallest_denied
    assert total > ceiling - MAX_STEP
    return total


def assert_one_reservation_per_granted_step(rows: Sequence[Row], sync_redis: redis.Redis) -> None:
    granted = [row for row in rows if row["decision"] == Decision.ALLOW]
    rids = [row["rid"] for row in granted]
    assert len(set(rids)) == len(rids), "a reservation id was handed out twice"
    assert all(row["rid"] == reservation_id(row["task"], row["step"]) for row in granted)
    records, leased = reservation_records(sync_redis)
    assert records == set(rids), "Redis holds reservation records that no granted answer accounts for (or misses some)"
    assert leased == set(rids)
