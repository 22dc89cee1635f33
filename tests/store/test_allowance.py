"""The local allowance (docs/local-allowance.md) against the real Valkey: a sidecar takes a slice of a task's budget,
decides checks from it, records them in Redis when it settles, hands back what is unused, and a dead holder's slice
comes back after its lease. Clocks are injected (no sleeps); the randomized tests use fixed seeds."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from budgetwarden.allowance import Allowances, AllowanceSettings
from budgetwarden.domain import (
    Amount,
    Bound,
    Candidate,
    CheckPlan,
    Shape,
    SliceLeft,
    Thresholds,
    cost_slice_bp,
    local_candidate,
    slice_size,
)
from budgetwarden.domain._model import CheckInput, Counter, Decision, Outcome, ReportStatus, UsageInput
from budgetwarden.domain._policy import parse_policy
from budgetwarden.limiter import CheckResult, Limiter, StepConflictError
from budgetwarden.store import AllowanceStore, SettledStep, SettleStatus, TenantKeys, reservation_id
from budgetwarden.store._store import BudgetStore

from support import SettableClock, free_port

NOW = 1_796_000_000_000 + 30_000  # mid-minute, mid-day: no window rolls over unless a test moves the clock
POLICY = parse_policy(
    """
tenants:
  acme:
    time_zone: UTC
    windows:
      day: {tokens: 20000, usd: 5}
models:
  small: {input_usd_per_mtok: 1, output_usd_per_mtok: 4}
default_task_type: plain
task_types:
  plain:
    per_task: {tokens: 10000}
  soft:
    per_task: {tokens: 10000}
    soft_threshold: 0.5
    checkpoint_threshold: 0.8
    degrade:
      - {name: short, max_context_tokens: 100}
""",
    "test",
)
LEASE_MS = 600_000  # the default lease the limiter gives a step


def step(step_id: str, tokens: int, task: str = "t1", task_type: str = "plain") -> CheckInput:
    return CheckInput(
        tenant_id="acme",
        task_id=task,
        step_id=step_id,
        task_type=task_type,
        model="small",
        input_tokens=tokens,
        output_tokens=0,
        tool_calls=0,
    )


def usage(task: str, step_id: str, tokens: int) -> UsageInput:
    return UsageInput(
        tenant_id="acme",
        reservation_id="",
        task_id=task,
        step_id=step_id,
        task_type="",
        model="small",
        input_tokens=tokens,
        output_tokens=0,
        cached_input_tokens=0,
        tool_calls=0,
        outcome=Outcome.COMPLETED,
        idempotency_key="",
        timestamp_ms=None,
    )


def make_limiter(redis: Redis, clock: SettableClock, allowance: AllowanceSettings | None = None) -> Limiter:
    store = BudgetStore(redis)
    allowances = None if allowance is None else Allowances(AllowanceStore(store), allowance)
    return Limiter(
        store, lambda: POLICY, clock=clock, check_deadline_s=30.0, store_deadline_s=30.0, allowances=allowances
    )


def allowances_of(limiter: Limiter) -> Allowances:
    assert limiter.allowances is not None
    return limiter.allowances


async def task_hash(redis: Redis, task: str = "t1") -> dict[str, int]:
    raw = await redis.hgetall(TenantKeys("acme").task(task))
    return {k.decode(): int(v) for k, v in raw.items() if v.isdigit() or v.lstrip(b"-").isdigit()}


async def windows_reserved(redis: Redis) -> dict[bytes, int]:
    keys = [k async for k in redis.scan_iter(match=TenantKeys("acme").prefix + "win:*")]
    return {k: int(await redis.hget(k, "reserved") or 0) for k in keys}


async def slice_records(redis: Redis) -> list[bytes]:
    keys = [k async for k in redis.scan_iter(match=TenantKeys("acme").resv_prefix + "*")]
    return [k for k in keys if await redis.hget(k, "kind") == b"slice"]


async def day_reserved(redis: Redis) -> int:
    return sum((await windows_reserved(redis)).values())


async def check(limiter: Limiter, request: CheckInput) -> CheckResult:
    result = await limiter.check(request)
    assert isinstance(result, CheckResult)
    return result


async def test_a_slice_is_reserved_in_redis_and_the_next_checks_are_decided_from_it(async_redis: Redis) -> None:
    await async_redis.flushall()
    clock = SettableClock(NOW)
    limiter = make_limiter(async_redis, clock, AllowanceSettings(cap_tokens=2000, share_bp=5000))
    first = await check(limiter, step("s1", 100))  # the task's first check fixes its ceiling, in the store
    assert allowances_of(limiter).local_checks == 0
    second = await check(limiter, step("s2", 300))  # takes min(2000, 50% of 9900) and grants 300 of it
    third = await check(limiter, step("s3", 300))
    assert [r.verdict.decision for r in (first, second, third)] == [Decision.ALLOW] * 3
    assert allowances_of(limiter).local_checks == 2
    assert third.reservation_id == reservation_id("t1", "s3")
    assert third.lease_expires_ms == NOW + LEASE_MS
    task = await task_hash(async_redis)
    assert task["reserved"] == 100 + 2000  # the first step and the whole slice, granted or not
    assert await day_reserved(async_redis) == 100 + 2000
    assert allowances_of(limiter).held()[("acme", "t1")].tokens == 2000 - 600


async def test_the_same_step_again_replays_and_another_request_for_it_is_a_conflict(async_redis: Redis) -> None:
    await async_redis.flushall()
    limiter = make_limiter(async_redis, SettableClock(NOW), AllowanceSettings())
    await check(limiter, step("s1", 100))
    granted = await check(limiter, step("s2", 300))
    again = await check(limiter, step("s2", 300))
    assert (again.replayed, again.reservation_id, again.verdict) == (True, granted.reservation_id, granted.verdict)
    assert isinstance((await limiter.check_many([step("s2", 301)]))[0], StepConflictError)
    assert allowances_of(limiter).local_checks == 1


async def test_the_unused_slice_is_handed_back_on_shutdown_and_granted_steps_keep_their_reservations(
    async_redis: Redis,
) -> None:
    await async_redis.flushall()
    clock = SettableClock(NOW)
    limiter = make_limiter(async_redis, clock, AllowanceSettings(cap_tokens=3000, share_bp=10_000))
    await check(limiter, step("s1", 100))
    for n in range(2, 6):
        await check(limiter, step(f"s{n}", 200))
    assert (await task_hash(async_redis))["reserved"] == 100 + 3000
    await allowances_of(limiter).close(clock())
    task = await task_hash(async_redis)
    assert (task["reserved"], task["active"]) == (100 + 4 * 200, 5)
    assert await day_reserved(async_redis) == 900
    record = await async_redis.hgetall(TenantKeys("acme").reservation(reservation_id("t1", "s3")))
    assert (record[b"state"], record[b"amount"], record[b"lease"]) == (
        b"reserved",
        b"200",
        str(NOW + LEASE_MS).encode(),
    )
    (slice_key,) = await slice_records(async_redis)
    assert await async_redis.hget(slice_key, "state") == b"released"


async def test_an_idle_slice_is_handed_back_by_the_sweep_and_a_busy_one_is_renewed(async_redis: Redis) -> None:
    await async_redis.flushall()
    clock = SettableClock(NOW)
    settings = AllowanceSettings(cap_tokens=1000, share_bp=10_000, idle_ms=5_000, lease_margin_ms=60_000)
    limiter = make_limiter(async_redis, clock, settings)
    await check(limiter, step("s1", 100))
    await check(limiter, step("s2", 100))
    clock.advance(2)
    await allowances_of(limiter).sweep(clock())  # used 2 s ago: its step is settled, the slice kept and renewed
    assert (await task_hash(async_redis))["reserved"] == 100 + 1000
    (key,) = await slice_records(async_redis)
    assert int(await async_redis.hget(key, "lease") or 0) == clock() + LEASE_MS + 60_000
    assert int(await async_redis.hget(key, "amount") or 0) == 900  # s2 moved to its own reservation
    clock.advance(5)
    await allowances_of(limiter).sweep(clock())
    assert (await task_hash(async_redis))["reserved"] == 200
    assert allowances_of(limiter).held() == {}


async def test_a_dead_holders_slice_comes_back_after_its_lease(async_redis: Redis) -> None:
    await async_redis.flushall()
    clock = SettableClock(NOW)
    settings = AllowanceSettings(cap_tokens=10_000, share_bp=10_000, lease_margin_ms=30_000)
    dead = make_limiter(async_redis, clock, settings)
    await check(dead, step("s1", 100))
    assert (await check(dead, step("s2", 400))).verdict.decision is Decision.ALLOW  # holds the rest of the task
    # The holder dies: no settle, no hand-back. Its slice strands the task's budget until its lease lapses...
    other = make_limiter(async_redis, clock, AllowanceSettings())
    assert (await check(other, step("s3", 1000))).verdict.decision is Decision.DENY
    # The slice's lease is the longest step lease granted from it plus the margin: a millisecond before it ends...
    clock.now_ms = NOW + LEASE_MS + 30_000 - 1
    assert (await check(other, step("s4", 1000))).verdict.decision is Decision.DENY
    clock.advance(0.001)
    # ...and when it ends, any script's sweep hands it back (s2, granted from it, lapsed with it; s1 before).
    assert (await check(other, step("s5", 1000))).verdict.decision is Decision.ALLOW
    assert (await task_hash(async_redis))["reserved"] == 1000


async def test_reports_of_locally_decided_steps_are_accounted_as_on_the_store_path(async_redis: Redis) -> None:
    rng = random.Random(17)
    plan = [(f"s{n}", rng.randint(50, 600), rng.randint(0, 900)) for n in range(12)]

    async def run(allowance: AllowanceSettings | None) -> tuple[list[tuple[object, ...]], dict[str, int], int]:
        await async_redis.flushall()
        clock = SettableClock(NOW)
        limiter = make_limiter(async_redis, clock, allowance)
        applied = []
        for step_id, asked, used in plan:
            result = await check(limiter, step(step_id, asked))
            assert result.verdict.decision is Decision.ALLOW
            (item,) = await limiter.report([usage("t1", step_id, used)])
            applied.append((item.status, item.charged, item.charged_usd, item.refunded, item.overage, item.late))
            clock.advance(1)
        if limiter.allowances is not None:
            await limiter.allowances.close(clock())
        events = await async_redis.xlen(TenantKeys("acme").usage)
        return applied, await task_hash(async_redis), events

    on_store = await run(None)
    local = await run(AllowanceSettings(cap_tokens=5000))
    assert local == on_store
    assert local[1]["reserved"] == 0
    assert local[1]["used"] == sum(used for _, _, used in plan)


@pytest.mark.parametrize("seed", range(1, 9))
async def test_several_holders_drawing_on_one_task_never_grant_past_its_ceiling(async_redis: Redis, seed: int) -> None:
    """Four sidecars (limiters with their own holders) check steps of random sizes on two tasks concurrently; about
    half the grants are reported, mostly to the sidecar that granted them (as an agent reports to its own sidecar),
    now and then through another one; idle sweeps run between rounds. Zero overspend: what is used plus what grants
    still hold never passes a task's ceiling nor the day's limit. Once every holder has handed back, Redis holds
    exactly what the unreported grants hold."""
    await async_redis.flushall()
    rng = random.Random(seed)
    clock = SettableClock(NOW)
    holders = [
        make_limiter(async_redis, clock, AllowanceSettings(cap_tokens=rng.choice([500, 2000, 8000]), share_bp=3000))
        for _ in range(4)
    ]
    used: dict[str, int] = {"t1": 0, "t2": 0}
    held: dict[tuple[str, str], tuple[int, Limiter]] = {}  # (task, step) -> what an unreported grant holds, and where
    n = 0
    for _round in range(6):
        batch = []
        for _ in range(24):
            n += 1
            task = rng.choice(["t1", "t2"])
            request = step(f"s{n}", rng.randint(1, 900), task, rng.choice(["plain", "soft"]) if n > 2 else "plain")
            batch.append((rng.choice(holders), request))
        results = await asyncio.gather(*(limiter.check(request) for limiter, request in batch))
        for (limiter, request), result in zip(batch, results, strict=True):
            if result.verdict.decision in (Decision.ALLOW, Decision.DEGRADE):
                held[(request.task_id, request.step_id)] = (result.verdict.granted, limiter)
        for task, step_id in rng.sample(sorted(held), k=len(held) // 2):
            granted, limiter = held.pop((task, step_id))
            spent = rng.randint(0, granted)
            used[task] += spent
            if rng.random() < 0.25:  # now and then through another sidecar, before the granting one settled it
                limiter = rng.choice(holders)
            await limiter.report([usage(task, step_id, spent)])
        holding = {task: sum(g for (t, _), (g, _) in held.items() if t == task) for task in used}
        # A report sent elsewhere is charged before the granting holder settles its step: until then that step's
        # tokens count both as used and in the slice. Every holder settles first, so Redis's counters are exact here.
        for limiter in holders:
            await allowances_of(limiter).sweep(clock())
        for task in used:
            assert used[task] + holding[task] <= 10_000
            counters = await task_hash(async_redis, task)
            assert counters["used"] + counters["reserved"] <= 10_000
        assert sum(used.values()) + sum(holding.values()) <= 20_000
        clock.advance(rng.choice([0.5, 3, 6]))
        await allowances_of(rng.choice(holders)).sweep(clock())
    for limiter in holders:
        await allowances_of(limiter).close(clock())
    for task in ("t1", "t2"):
        counters = await task_hash(async_redis, task)
        assert counters["used"] == used[task]
        assert counters["reserved"] == sum(g for (t, _), (g, _) in held.items() if t == task)
    assert await day_reserved(async_redis) == sum(g for g, _ in held.values())
    assert sum(allowances_of(limiter).local_checks for limiter in holders) > 0


async def test_a_check_the_slice_cannot_hold_is_decided_by_the_store_without_the_slice_in_the_way(
    async_redis: Redis,
) -> None:
    await async_redis.flushall()
    limiter = make_limiter(async_redis, SettableClock(NOW), AllowanceSettings(cap_tokens=1000))
    await check(limiter, step("s1", 100))
    await check(limiter, step("s2", 100))  # a slice of 1000
    big = await check(limiter, step("s3", 9000))  # does not fit the slice: handed back, then the store allows it all
    assert big.verdict.decision is Decision.ALLOW
    assert (await task_hash(async_redis))["reserved"] == 100 + 100 + 9000


async def test_local_grants_stop_at_the_soft_threshold_and_the_store_degrades_past_it(async_redis: Redis) -> None:
    await async_redis.flushall()
    limiter = make_limiter(async_redis, SettableClock(NOW), AllowanceSettings(cap_tokens=50_000, share_bp=10_000))
    await check(limiter, step("s1", 1000, task_type="soft"))
    # The slice is what is left under the soft line (5000 - 1000): the store decides once it runs out.
    results = [await check(limiter, step(f"s{n}", 1000, task_type="soft")) for n in range(2, 7)]
    assert [r.verdict.decision for r in results] == [Decision.ALLOW] * 4 + [Decision.DEGRADE]
    assert allowances_of(limiter).local_checks == 4


async def test_a_slice_taken_in_one_day_is_not_used_in_the_next(async_redis: Redis) -> None:
    await async_redis.flushall()
    next_day = NOW - NOW % 86_400_000 + 86_400_000
    clock = SettableClock(next_day - 60_000)
    limiter = make_limiter(async_redis, clock, AllowanceSettings(cap_tokens=1000, share_bp=10_000))
    await check(limiter, step("s1", 100))
    await check(limiter, step("s2", 100))
    clock.advance(120)  # the next day (another window key), the leases still held
    await check(limiter, step("s3", 100))
    # The old slice was handed back and a new one taken in the new day's window, which counts it (s3 in it).
    held = allowances_of(limiter).held()[("acme", "t1")]
    assert held.tokens == 900
    reserved = await windows_reserved(async_redis)
    assert sorted(reserved.values()) == [200, 1000]


# --- the script and the rules on their own --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "cap", "share_bp", "expected"),
    [
        (9900, 2000, 5000, 2000),
        (1000, 2000, 5000, 500),
        (None, 2000, 5000, 2000),
        (0, 2000, 5000, 0),
        (7, None, 5000, 3),
    ],
)
def test_slice_size_is_the_cap_or_the_share_of_what_is_left(
    left: int | None, cap: int | None, share_bp: int, expected: int
) -> None:
    assert slice_size(left, cap, share_bp) == expected


def test_only_the_step_as_asked_that_fits_is_decided_locally() -> None:
    shape = Shape(model="m", input_tokens=10, output_tokens=0, tool_calls=0)
    asked = Candidate(Amount(10, 5), Bound.SOFT, shape, None)
    degraded = Candidate(Amount(5, 2), Bound.CHECKPOINT, shape, "short")
    plan = CheckPlan(
        requested=Amount(10, 5), task_type="t", thresholds=Thresholds(), lease_seconds=None, counted=(),
        step=None, candidates=(asked, degraded), shape=shape,
    )  # fmt: skip
    assert local_candidate(plan, SliceLeft(10, 5)) is asked
    assert local_candidate(plan, SliceLeft(9, 5)) is None
    assert local_candidate(plan, SliceLeft(10, 4)) is None
    assert local_candidate(plan, SliceLeft(10, None)) is asked
    assert local_candidate(replace(plan, candidates=(degraded,)), SliceLeft(100, None)) is None


async def test_settling_a_step_the_store_already_holds_hands_its_tokens_back(async_redis: Redis) -> None:
    await async_redis.flushall()
    clock = SettableClock(NOW)
    plain = make_limiter(async_redis, clock)
    await check(plain, step("s1", 100))
    await check(plain, step("s2", 300))  # reserved in the store
    store = AllowanceStore(BudgetStore(async_redis))
    taken = await store.take(
        "acme", "t1", "h1", (), cap_tokens=1000, cap_usd=None, share_bp=10_000, wanted=Amount(1),
        lease_until_ms=NOW + 700_000, now_ms=NOW,
    )  # fmt: skip
    assert (taken.taken, taken.tokens, taken.usd) == (True, 1000, None)
    steps = [
        SettledStep(
            step_id=s,
            reservation_id=reservation_id("t1", s),
            lease_until_ms=NOW + 1000,
            amount=Amount(300, 0),
            fingerprint=fp,
            answer="",
            label="",
        )
        for s, fp in (("s2", "other"), ("s9", "x"))
    ]
    settled = await store.settle("acme", "t1", "h1", steps, give_back=True, lease_until_ms=NOW + 1000, now_ms=NOW)
    assert settled.steps == (SettleStatus.CONFLICT, SettleStatus.RECORDED)
    assert settled.handed_back == 1000 - 300  # s2's grant went back with the rest; s9 keeps its 300
    assert (await task_hash(async_redis))["reserved"] == 100 + 300 + 300


async def test_a_slice_refuses_to_settle_more_than_it_holds(async_redis: Redis) -> None:
    await async_redis.flushall()
    await check(make_limiter(async_redis, SettableClock(NOW)), step("s1", 100))
    store = AllowanceStore(BudgetStore(async_redis))
    await store.take(
        "acme", "t1", "h1", (), cap_tokens=100, cap_usd=None, share_bp=10_000, wanted=Amount(1),
        lease_until_ms=NOW + 700_000, now_ms=NOW,
    )  # fmt: skip
    too_much = [
        SettledStep(
            step_id="s2",
            reservation_id=reservation_id("t1", "s2"),
            lease_until_ms=NOW,
            amount=Amount(101),
            fingerprint="",
            answer="",
            label="",
        )
    ]
    with pytest.raises(Exception, match="more than the slice holds"):
        await store.settle("acme", "t1", "h1", too_much, give_back=True, lease_until_ms=NOW, now_ms=NOW)
    assert (await task_hash(async_redis))["reserved"] == 200  # nothing written


async def test_no_slice_is_taken_before_the_tasks_first_check(async_redis: Redis) -> None:
    await async_redis.flushall()
    store = AllowanceStore(BudgetStore(async_redis))
    taken = await store.take(
        "acme", "new", "h1", (), cap_tokens=100, cap_usd=None, share_bp=10_000, wanted=Amount(1),
        lease_until_ms=NOW + 1, now_ms=NOW,
    )  # fmt: skip
    assert (taken.status, taken.counters[0]) == (0, Counter(limit=None, used=0, reserved=0))
    assert await async_redis.dbsize() == 0


async def test_a_local_answer_is_the_answer_the_store_path_gives(async_redis: Redis) -> None:
    async def answers(allowance: AllowanceSettings | None) -> list[tuple[object, ...]]:
        await async_redis.flushall()
        limiter = make_limiter(async_redis, SettableClock(NOW), allowance)
        out = []
        for n, tokens in enumerate([100, 250, 40, 700, 5]):
            result = await check(limiter, step(f"s{n}", tokens))
            out.append((result.verdict, result.requested, result.reservation_id, result.lease_expires_ms))
        return out

    local = await answers(AllowanceSettings())
    assert local == await answers(None)


async def test_a_locally_granted_step_replays_from_redis_once_settled_and_can_be_released(async_redis: Redis) -> None:
    await async_redis.flushall()
    clock = SettableClock(NOW)
    limiter = make_limiter(async_redis, clock, AllowanceSettings())
    await check(limiter, step("s1", 100))
    granted = await check(limiter, step("s2", 300))
    await check(limiter, step("s3", 200))
    assert allowances_of(limiter).local_checks == 2
    # Released through the sidecar that granted it: settled first, so the store finds its reservation.
    assert await limiter.release("acme", reservation_id("t1", "s3")) == (1, 200)
    await allowances_of(limiter).close(clock())
    # Checked again through another sidecar: the store replays what was answered locally.
    again = await check(make_limiter(async_redis, clock), step("s2", 300))
    assert again.replayed
    assert (again.verdict.decision, again.verdict.granted, again.lease_expires_ms, again.reservation_id) == (
        granted.verdict.decision,
        granted.verdict.granted,
        granted.lease_expires_ms,
        granted.reservation_id,
    )
    assert (await task_hash(async_redis))["reserved"] == 100 + 300


async def test_a_step_reported_through_another_sidecar_before_it_is_settled_is_not_reserved_again(
    async_redis: Redis,
) -> None:
    await async_redis.flushall()
    clock = SettableClock(NOW)
    granting = make_limiter(async_redis, clock, AllowanceSettings(cap_tokens=1000, share_bp=10_000))
    await check(granting, step("s1", 100))
    await check(granting, step("s2", 300))  # granted locally, not settled yet
    (applied,) = await make_limiter(async_redis, clock).report([usage("t1", "s2", 250)])
    assert applied.status is ReportStatus.UNRESERVED  # the store knows no reservation of it yet: charged as used
    await allowances_of(granting).close(clock())  # the settle sees the report and reserves nothing for s2
    task = await task_hash(async_redis)
    assert (task["used"], task["reserved"]) == (250, 100)
    assert await day_reserved(async_redis) == 100


async def test_a_step_reported_elsewhere_before_its_settle_leaves_the_slice_it_was_granted_from(
    async_redis: Redis,
) -> None:
    """Kept in the slice, the step's tokens would be granted again on top of the usage its report charged."""
    await async_redis.flushall()
    clock = SettableClock(NOW)
    granting = make_limiter(async_redis, clock, AllowanceSettings(cap_tokens=1000, share_bp=10_000))
    await check(granting, step("s1", 100))
    await check(granting, step("s2", 300))  # granted locally from a slice of 1000, not settled yet
    (applied,) = await make_limiter(async_redis, clock).report([usage("t1", "s2", 250)])
    assert applied.status is ReportStatus.UNRESERVED
    await allowances_of(granting).sweep(clock())  # settles s2 and keeps the slice
    (left,) = allowances_of(granting).held().values()
    assert left.tokens == 1000 - 300
    task = await task_hash(async_redis)
    assert (task["used"], task["reserved"]) == (250, 100 + 700)


async def test_while_redis_does_not_answer_checks_that_fit_a_held_slice_are_still_decided(async_redis: Redis) -> None:
    await async_redis.flushall()
    limiter = make_limiter(async_redis, SettableClock(NOW), AllowanceSettings(cap_tokens=1000, share_bp=10_000))
    await check(limiter, step("s1", 100))
    await check(limiter, step("s2", 100))  # a slice of 1000 is held
    # Nothing listens there: every call is refused at once (no retries).
    unreachable = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=5, retry=Retry(NoBackoff(), 0))
    limiter.store = BudgetStore(unreachable)
    allowances_of(limiter).store = AllowanceStore(limiter.store)
    within = await check(limiter, step("s3", 800))
    assert (within.verdict.decision, within.from_fail_mode) == (Decision.ALLOW, False)
    beyond = await check(limiter, step("s4", 800))  # does not fit what is left: the store, so the fail mode
    assert (beyond.verdict.decision, beyond.from_fail_mode) == (Decision.DENY, True)
    await unreachable.aclose()


async def test_a_batch_is_decided_from_slices_held_already_and_takes_none(async_redis: Redis) -> None:
    """CheckStream's batches keep their one store call per tenant: no take inside a batch."""
    await async_redis.flushall()
    limiter = make_limiter(async_redis, SettableClock(NOW), AllowanceSettings(cap_tokens=1000, share_bp=10_000))
    await check(limiter, step("s1", 100))
    takes = allowances_of(limiter).takes
    batch = await limiter.check_many([step("s2", 100), step("s3", 100)])  # no slice yet: the store decides both
    assert all(isinstance(r, CheckResult) and r.verdict.decision is Decision.ALLOW for r in batch)
    assert (allowances_of(limiter).takes, allowances_of(limiter).local_checks) == (takes, 0)
    await check(limiter, step("s4", 100))  # unary: takes a slice
    batch = await limiter.check_many([step("s5", 100), step("s6", 100), step("s7", 5000)])
    assert allowances_of(limiter).local_checks == 3  # s4, s5, s6; s7 does not fit the slice: the store's
    assert [r.verdict.decision for r in batch if isinstance(r, CheckResult)] == [Decision.ALLOW] * 3
    assert (await task_hash(async_redis))["reserved"] == 300 + 1000 + 5000


async def test_cost_is_sliced_in_the_proportion_tokens_are(async_redis: Redis) -> None:
    """A slice holds the same share of the cost room as of the token room: a token cap binding keeps the cost slice
    small too (the day's cost limit is $5 here; a slice of 2,000 of 9,900 tokens takes 20.2% of it, not half)."""
    await async_redis.flushall()
    limiter = make_limiter(async_redis, SettableClock(NOW), AllowanceSettings(cap_tokens=2000, share_bp=5000))
    first = await check(limiter, step("s1", 100))
    day = first.scopes[-1][1]
    assert day.limit_usd == 5_000_000
    await check(limiter, step("s2", 100))
    left_usd = day.limit_usd - day.used_usd - day.reserved_usd
    usd = slice_size(left_usd, None, cost_slice_bp(2000, 9900, 5000))
    assert usd == left_usd * 2020 // 10_000
    assert allowances_of(limiter).held()[("acme", "t1")] == SliceLeft(2000 - 100, usd - first.verdict.granted_usd)
