"""A slice's steps are settled in store calls of at most SETTLE_BATCH steps (one call of thousands held the event loop
and Valkey for tens of milliseconds), in order, the hand-back with the last call; a call that fails leaves its steps
and the later ones pending, and the next settle records them once. Against the real Valkey; the store is only counted
and, once, made to fail before its call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from budgetwarden.allowance import SETTLE_BATCH, Allowances, AllowanceSettings
from budgetwarden.domain._model import CheckInput, Decision
from budgetwarden.domain._policy import parse_policy
from budgetwarden.limiter import CheckResult, Limiter
from budgetwarden.store import AllowanceStore, Settled, SettledStep, TenantKeys
from budgetwarden.store._store import BudgetStore

from support import SettableClock

NOW = 1_796_000_000_000 + 30_000
POLICY = parse_policy(
    """
tenants:
  acme:
    time_zone: UTC
    windows:
      day: {tokens: 100000}
default_task_type: plain
task_types:
  plain:
    per_task: {tokens: 50000}
""",
    "test",
)
STEPS = 2 * SETTLE_BATCH + 50  # three calls


class CountingStore(AllowanceStore):
    """The real store; counts the settle calls and their sizes, and fails the call numbered ``fail_at`` once."""

    def __init__(self, store: BudgetStore, fail_at: int | None = None) -> None:
        super().__init__(store)
        self.calls: list[tuple[int, bool]] = []
        self.fail_at = fail_at

    async def settle(
        self, tenant_id: str, task_id: str, slice_ref: str, steps: Sequence[SettledStep], **kw: Any
    ) -> Settled:
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            self.fail_at = None
            self.calls.append((-1, kw["give_back"]))
            raise RedisConnectionError("connection lost")
        self.calls.append((len(steps), kw["give_back"]))
        return await super().settle(tenant_id, task_id, slice_ref, steps, **kw)


def check(n: int) -> CheckInput:
    return CheckInput(
        tenant_id="acme",
        task_id="t1",
        step_id=f"s{n}",
        task_type="plain",
        model="",
        input_tokens=10,
        output_tokens=0,
        tool_calls=0,
    )


async def grant(redis: Redis, fail_at: int | None = None) -> tuple[Limiter, CountingStore, SettableClock]:
    await redis.flushall()
    clock = SettableClock(NOW)
    store = BudgetStore(redis)
    counting = CountingStore(store, fail_at)
    allowances = Allowances(counting, AllowanceSettings(cap_tokens=40_000, share_bp=10_000))
    limiter = Limiter(
        store, lambda: POLICY, clock=clock, check_deadline_s=30.0, store_deadline_s=30.0, allowances=allowances
    )
    for n in range(STEPS + 1):  # the first on the store path, the rest from the slice
        result = await limiter.check(check(n))
        assert isinstance(result, CheckResult)
        assert result.verdict.decision == Decision.ALLOW
    assert allowances.local_checks == STEPS
    return limiter, counting, clock


async def recorded(redis: Redis) -> tuple[int, int, int]:
    task = await redis.hgetall(TenantKeys("acme").task("t1"))
    keys = [k async for k in redis.scan_iter(match=TenantKeys("acme").resv_prefix + "*")]
    steps = [k for k in keys if await redis.hget(k, "state") == b"reserved" and await redis.hget(k, "kind") != b"slice"]
    return int(task[b"reserved"]), int(task[b"active"]), len(steps)


async def test_a_hand_back_settles_its_steps_in_bounded_calls_and_hands_back_with_the_last(async_redis: Redis) -> None:
    limiter, store, clock = await grant(async_redis)
    assert limiter.allowances is not None
    await limiter.allowances.close(clock())
    assert store.calls == [(SETTLE_BATCH, False), (SETTLE_BATCH, False), (50, True)]
    assert await recorded(async_redis) == (10 * (STEPS + 1), STEPS + 1, STEPS + 1)  # the slice's rest handed back


async def test_a_failed_call_leaves_its_steps_and_the_later_ones_for_the_next_settle(async_redis: Redis) -> None:
    limiter, store, clock = await grant(async_redis, fail_at=1)
    assert limiter.allowances is not None
    await limiter.allowances.sweep(clock())  # the first call settles, the second fails: the rest stays pending
    assert store.calls == [(SETTLE_BATCH, False), (-1, False)]
    assert [len(held.pending) for held in limiter.allowances._held.values()] == [STEPS - SETTLE_BATCH]
    reserved, active, steps = await recorded(async_redis)
    assert (active, steps) == (1 + SETTLE_BATCH + 1, 1 + SETTLE_BATCH)  # the slice, still held, counts as active
    assert reserved == 10 + 40_000  # the first step and the slice (which holds the steps not settled yet)
    await limiter.allowances.close(clock())
    assert store.calls[2:] == [(SETTLE_BATCH, False), (50, True)]
    assert await recorded(async_redis) == (10 * (STEPS + 1), STEPS + 1, STEPS + 1)
