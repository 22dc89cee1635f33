"""Batched reports (one report.lua call per tenant and up to REPORT_BATCH records) apply exactly what the same records
apply one at a time. Hypothesis draws checks that reserve first, then usage records over a few tenants, tasks and
steps: with and without idempotency keys (repeats included, so duplicates happen), with and without a reservation
behind them (named by id or not), some timestamped into earlier windows (some of them gone), reported before or after
the leases lapse, and cuts them into batches at random. Both runs start from an empty store on the same fixed clocks;
they must agree on every answer, every counter and every usage event."""

from __future__ import annotations

import itertools
from dataclasses import asdict
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings
from redis.asyncio import Redis

from budgetwarden.domain._model import CheckInput, Outcome, ReportStatus, UsageInput
from budgetwarden.domain._policy import parse_policy
from budgetwarden.limiter import Limiter
from budgetwarden.store._keys import reservation_id
from budgetwarden.store._store import REPORT_BATCH, BudgetStore

NOW = 1_796_000_000_000
HOUR_MS = 3_600_000
LEASE_MS = 600_000
POLICY = parse_policy(
    """
tenants:
  acme:
    time_zone: UTC
    windows:
      minute: {tokens: 60000}
      day: {tokens: 90000, usd: 4000000}
  globex:
    windows:
      hour: {tokens: 40000}
models:
  big: {input_usd_per_mtok: 10, output_usd_per_mtok: 30}
  small: {input_usd_per_mtok: 1, output_usd_per_mtok: 4}
default_task_type: agent
task_types:
  agent:
    per_task: {tokens: 5000}
  plain: {}
""",
    "test",
)
TENANTS = ["acme", "globex", "initech"]
TASKS = ["t1", "t2", ""]
STEPS = ["s1", "s2", "s3", "s4"]

checks = st.builds(
    CheckInput,
    tenant_id=st.sampled_from(TENANTS),
    task_id=st.sampled_from(TASKS[:2]),
    step_id=st.sampled_from(STEPS),
    task_type=st.sampled_from(["", "plain"]),
    model=st.sampled_from(["big", "small"]),
    input_tokens=st.integers(0, 2000),
    output_tokens=st.integers(0, 500),
    tool_calls=st.just(0),
)
records = st.builds(
    UsageInput,
    tenant_id=st.sampled_from(TENANTS),
    reservation_id=st.sampled_from(["", "", reservation_id("t1", "s1"), "f" * 32]),
    task_id=st.sampled_from(TASKS),
    step_id=st.sampled_from(STEPS),
    task_type=st.sampled_from(["", "plain"]),
    model=st.sampled_from(["big", "small", "unknown"]),
    input_tokens=st.integers(0, 3000),
    output_tokens=st.integers(0, 1000),
    cached_input_tokens=st.just(0),
    tool_calls=st.integers(0, 3),
    outcome=st.just(Outcome.COMPLETED),
    idempotency_key=st.sampled_from(["", "", "k1", "k2", "k3"]),
    # Some records happened earlier: in other minute, hour and day windows than the rest of their batch, some of
    # which are past their grace and no longer charged.
    timestamp_ms=st.sampled_from([None, None, NOW - HOUR_MS, NOW - 2 * HOUR_MS, NOW - 24 * HOUR_MS]),
)


async def state(redis: Redis) -> dict[str, Any]:
    """Every counter and reservation record, and every usage event without its server-assigned stream id."""
    out: dict[str, Any] = {}
    for key in sorted(await redis.keys("*")):
        kind = (await redis.type(key)).decode()
        if kind == "hash":
            out[key.decode()] = await redis.hgetall(key)
        elif kind == "stream":
            out[key.decode()] = [fields for _, fields in await redis.xrange(key)]
        elif kind == "zset":
            out[key.decode()] = await redis.zrange(key, 0, -1, withscores=True)
        else:
            out[key.decode()] = await redis.get(key)
    return out


async def run(
    redis: Redis, reserve: list[CheckInput], usage: list[UsageInput], cuts: list[int], report_at: int = NOW
) -> Any:
    await redis.flushall()
    clock = [NOW]
    limiter = Limiter(
        BudgetStore(redis),
        lambda: POLICY,
        clock=lambda: clock[0],
        default_lease_s=LEASE_MS // 1000,
        store_deadline_s=30.0,
        check_deadline_s=30.0,
    )
    await limiter.check_many(reserve)
    clock[0] = report_at
    bounds = [0, *sorted(set(cuts)), len(usage)] if cuts else list(range(len(usage) + 1))
    applied = []
    for start, end in itertools.pairwise(bounds):
        applied += [asdict(item) for item in await limiter.report(usage[start:end])]
    return applied, await state(redis)


def one_record_per_marker(usage: list[UsageInput]) -> list[UsageInput]:
    """As a client sends them: a record repeated under its idempotency key (or, keyless, its step's) is the same record
    each time; a different record under a used key is refused (tests/store/test_report_truth.py)."""
    first: dict[tuple[str, str, str], UsageInput] = {}
    out = []
    for record in usage:
        target = record.reservation_id or reservation_id(record.task_id, record.step_id)
        marker = (record.tenant_id, "key", record.idempotency_key) if record.idempotency_key else (
            record.tenant_id, "step", target)  # fmt: skip
        out.append(first.setdefault(marker, record))
    return out


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    reserve=st.lists(checks, max_size=8),
    usage=st.lists(records, min_size=1, max_size=25),
    data=st.data(),
)
async def test_batches_apply_what_single_records_apply(
    async_redis: Redis, reserve: list[CheckInput], usage: list[UsageInput], data: st.DataObject
) -> None:
    usage = one_record_per_marker(usage)
    cuts = data.draw(st.lists(st.integers(0, len(usage)), max_size=4), label="batch cuts")
    report_at = data.draw(st.sampled_from([NOW, NOW + LEASE_MS + 1]), label="reported at")
    one_by_one = await run(async_redis, reserve, usage, [], report_at)
    batched = await run(async_redis, reserve, usage, cuts or [len(usage)], report_at)
    assert batched == one_by_one


async def test_a_report_larger_than_one_script_call_answers_in_the_order_asked(async_redis: Redis) -> None:
    """Records of several tenants, more than REPORT_BATCH of one of them, in one report: several script calls in one
    round trip, and the answers come back in the records' order."""
    await async_redis.flushall()
    limiter = Limiter(
        BudgetStore(async_redis), lambda: POLICY, clock=lambda: NOW, store_deadline_s=30.0, check_deadline_s=30.0
    )
    usage = [
        UsageInput(
            tenant_id=TENANTS[i % 3] if i % 4 == 0 else "acme",
            reservation_id="",
            task_id="t1",
            step_id=f"s{i}",
            task_type="",
            model="small",
            input_tokens=i,
            output_tokens=0,
            cached_input_tokens=0,
            tool_calls=0,
            outcome=Outcome.COMPLETED,
            idempotency_key=f"k{i}",
            timestamp_ms=None,
        )
        for i in range(2 * REPORT_BATCH + 50)
    ]
    usage.append(usage[7])  # a retry at the end: a duplicate, answered in its place

    applied = await limiter.report(usage)

    assert [item.charged for item in applied[:-1]] == [i for i in range(len(usage) - 1)]
    assert [item.status for item in applied[:-1]] == [ReportStatus.UNRESERVED] * (len(usage) - 1)
    assert applied[-1].status is ReportStatus.DUPLICATE
    totals = {tenant: sum(r.tokens for r in usage[:-1] if r.tenant_id == tenant) for tenant in TENANTS}
    for tenant, total in totals.items():
        (task_key,) = await async_redis.keys(f"*{{{tenant}}}:task:*")
        assert int(await async_redis.hget(task_key, "used")) == total
