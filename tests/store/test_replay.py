"""Checking a step again: the same request answers what the first check answered (decision, reason, advice, grant,
binding, reservation and lease), whatever the policy says by then; another request for a step that holds a reservation
is refused (FAILED_PRECONDITION naming the step) and changes nothing. Against the real Valkey through the Limiter with
an injected clock (over a real socket: tests/integration/test_replay_grpc.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, given, settings
from redis.asyncio import Redis

from budgetwarden.domain._model import CheckInput, Decision, Outcome, Reason, UsageInput
from budgetwarden.domain._policy import LoadedPolicy, parse_policy
from budgetwarden.limiter import CheckResult, Limiter, StepConflictError
from budgetwarden.store._replay import REPLAY_NOTE
from budgetwarden.store._store import BudgetStore

from support_policies import LADDER_POLICY

NOW = 1_796_000_000_000
# What an operator might change in the meantime: other prices, other rungs, no soft line, other windows.
CHANGED_POLICY = """
tenants:
  acme:
    windows:
      hour: {tokens: 3000}
models:
  big: {input_usd_per_mtok: 50, output_usd_per_mtok: 90}
  small: {input_usd_per_mtok: 7, output_usd_per_mtok: 9}
default_task_type: agent
task_types:
  agent:
    per_task: {tokens: 90000}
    degrade:
      - {name: tiny, max_output_tokens: 10}
  plain:
    per_task: {tokens: 100}
"""
LADDER = parse_policy(LADDER_POLICY, "ladder")
CHANGED = parse_policy(CHANGED_POLICY, "changed")


def request(step: str, input_tokens: int, output_tokens: int = 0, **fields: Any) -> CheckInput:
    values: dict[str, Any] = {"tenant_id": "acme", "task_id": "t1", "step_id": step, "task_type": "", "model": "big"}
    values |= {"input_tokens": input_tokens, "output_tokens": output_tokens, "tool_calls": 0} | fields
    return CheckInput(**values)


def first_answer_of(result: CheckResult) -> dict[str, Any]:
    """What a replay must repeat: the verdict (its message marked as a replay), reservation and lease."""
    verdict = replace(result.verdict, message=REPLAY_NOTE + result.verdict.message)
    return {"verdict": verdict, "reservation_id": result.reservation_id, "lease": result.lease_expires_ms}


def replay_of(result: CheckResult) -> dict[str, Any]:
    assert result.replayed, result.verdict
    return {"verdict": result.verdict, "reservation_id": result.reservation_id, "lease": result.lease_expires_ms}


async def snapshot(redis: Redis) -> dict[bytes, Any]:
    """Every counter and record in the store."""
    out: dict[bytes, Any] = {}
    for key in await redis.keys("*"):
        kind = await redis.type(key)
        if kind == b"hash":
            out[key] = await redis.hgetall(key)
        elif kind == b"zset":
            out[key] = await redis.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = kind
    return out


def make_limiter(redis: Redis, policy: Callable[[], LoadedPolicy], clock: Callable[[], int]) -> Limiter:
    """A limiter on the test's store with an injected clock and a check deadline no busy machine misses."""
    return Limiter(BudgetStore(redis), policy, check_deadline_s=30.0, clock=clock, store_deadline_s=30.0)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> int:
        return self.now


# --- the property -------------------------------------------------------------------------------------------------

checks = st.builds(
    request,
    step=st.sampled_from(["s1", "s2", "s3", "s4", "s5"]),
    input_tokens=st.integers(0, 3000),
    output_tokens=st.integers(0, 1500),
    task_id=st.sampled_from(["t1", "t2"]),
    task_type=st.sampled_from(["", "plain"]),
    model=st.sampled_from(["big", "small", ""]),
    tool_calls=st.integers(0, 3),
    task_ceiling=st.one_of(st.none(), st.integers(1, 6000)),
    lease_seconds=st.one_of(st.none(), st.integers(60, 600)),
)


@dataclass
class Again:
    """Check an earlier check's step again: with the same request (``change`` None) or with one field changed."""

    index: int
    change: tuple[str, Any] | None


agains = st.builds(
    Again,
    index=st.integers(0, 1000),
    change=st.one_of(
        st.none(),
        st.none(),
        st.tuples(st.just("input_tokens"), st.integers(0, 3000)),
        st.tuples(st.just("model"), st.sampled_from(["big", "small", "gpt-4o"])),
        st.tuples(st.just("task_ceiling"), st.integers(1, 6000)),
        st.tuples(st.just("task_type"), st.sampled_from(["", "plain"])),
        st.tuples(st.just("tool_calls"), st.integers(0, 3)),
        st.tuples(st.just("lease_seconds"), st.integers(60, 600)),  # not part of the request's fingerprint
    ),
)
operations = st.lists(
    st.one_of(
        checks,
        agains,
        agains,
        st.lists(st.one_of(checks, agains), min_size=1, max_size=6),  # one batch (a CheckStream message)
        st.sampled_from(["advance", "report", "policy"]),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
async def test_a_granted_step_checked_again_answers_what_it_answered(async_redis: Redis, ops: list[Any]) -> None:
    await async_redis.flushall()
    clock = Clock()
    policy: list[LoadedPolicy] = [LADDER]
    limiter = make_limiter(async_redis, lambda: policy[0], clock)
    sent: list[CheckInput] = []
    granted: dict[tuple[str, str], tuple[CheckInput, dict[str, Any]]] = {}  # by (task, step): the request, answer

    def resolve(op: CheckInput | Again) -> CheckInput:
        if isinstance(op, CheckInput) or not sent:
            return op if isinstance(op, CheckInput) else request("s1", 100)
        earlier = sent[op.index % len(sent)]
        return earlier if op.change is None else replace(earlier, **{op.change[0]: op.change[1]})

    def expect(check: CheckInput, result: CheckResult | StepConflictError) -> None:
        held = granted.get((check.task_id, check.step_id))
        same = held is not None and replace(held[0], lease_seconds=check.lease_seconds) == check
        if held is not None and not same:
            event("another request: refused")
            assert isinstance(result, StepConflictError), result
            assert f"step {check.step_id!r} of task {check.task_id!r}" in str(result)
            return
        assert isinstance(result, CheckResult), result
        assert not result.from_fail_mode, result.verdict  # the store answered every check
        if held is not None:
            event(f"replay of {held[1]['verdict'].decision.name} {held[1]['verdict'].reason.name}")
            assert replay_of(result) == held[1]
            return
        assert not result.replayed
        if result.lease_expires_ms is not None:  # it reserved: from now on the step replays this answer
            granted[(check.task_id, check.step_id)] = (check, first_answer_of(result))

    for op in ops:
        if op == "advance":
            clock.now += 1_000  # well within every lease (60 s at least)
        elif op == "policy":
            policy[0] = CHANGED if policy[0] is LADDER else LADDER
            event("the policy changed")
        elif op == "report":
            if granted:
                task_id, step_id = min(granted)
                record = UsageInput(
                    tenant_id="acme",
                    reservation_id="",
                    task_id=task_id,
                    step_id=step_id,
                    task_type="",
                    model="small",
                    input_tokens=10,
                    output_tokens=5,
                    cached_input_tokens=0,
                    tool_calls=0,
                    outcome=Outcome.COMPLETED,
                    idempotency_key="",
                    timestamp_ms=None,
                )
                await limiter.report([record])  # a reported step still replays its answer
        elif isinstance(op, list):
            batch = [resolve(item) for item in op]
            results = await limiter.check_many(batch)
            for check, result in zip(batch, results, strict=True):
                expect(check, result)
            sent.extend(batch)
        else:
            check = resolve(op)
            before = await snapshot(async_redis)
            result = (await limiter.check_many([check]))[0]
            expect(check, result)
            if isinstance(result, StepConflictError) or result.replayed:
                assert await snapshot(async_redis) == before  # a refusal or a replay changes nothing
            sent.append(check)


# --- the same, by example ---------------------------------------------------------------------------------------


async def test_a_degraded_step_replays_its_advice_even_after_the_policy_changed(async_redis: Redis) -> None:
    await async_redis.flushall()
    policy = [LADDER]
    limiter = make_limiter(async_redis, lambda: policy[0], lambda: NOW)
    first = await limiter.check(request("s1", 2000, 1000))  # 3000 > the 2500 step cap: degraded
    verdict = first.verdict
    assert (verdict.decision, verdict.reason, verdict.binding_scope) == (
        Decision.DEGRADE,
        Reason.DEGRADED_TO_FIT,
        "step",
    )
    assert verdict.advice is not None
    assert (verdict.advice.rung, verdict.advice.model, verdict.advice.max_output_tokens) == ("cheaper", "small", 300)
    assert verdict.granted == 2300
    policy[0] = CHANGED
    again = await limiter.check(request("s1", 2000, 1000, lease_seconds=30))
    assert replay_of(again) == first_answer_of(first)
    assert again.requested == first.requested
    assert again.verdict.message.startswith("step was checked before: degraded by rung 'cheaper'")


async def test_a_degraded_step_past_the_soft_line_replays_its_reason(async_redis: Redis) -> None:
    await async_redis.flushall()
    limiter = make_limiter(async_redis, lambda: LADDER, lambda: NOW)
    assert (await limiter.check(request("s1", 2400))).verdict.decision is Decision.ALLOW
    first = await limiter.check(request("s2", 1000, 500))  # past the soft line (2500 of 5000): degraded
    assert first.verdict.decision is Decision.DEGRADE
    await limiter.check(request("s3", 100, model="small"))  # the figures move on
    again = await limiter.check(request("s2", 1000, 500))
    assert replay_of(again) == first_answer_of(first)


async def test_another_request_for_a_held_step_is_refused_and_changes_nothing(async_redis: Redis) -> None:
    await async_redis.flushall()
    limiter = make_limiter(async_redis, lambda: LADDER, lambda: NOW)
    first = await limiter.check(request("s1", 500))
    assert first.verdict.granted == 500
    before = await snapshot(async_redis)
    for other in (
        request("s1", 90_000),
        request("s1", 500, model="small"),
        request("s1", 500, 1),
        request("s1", 500, task_type="plain"),
        request("s1", 500, task_ceiling=4000),
        request("s1", 500, tool_calls=2),
    ):
        with pytest.raises(StepConflictError, match=r"^step_id: step 's1' of task 't1' was already checked with a "):
            await limiter.check(other)
        assert await snapshot(async_redis) == before, other
    assert "use a new step_id, or Release it first" in str(StepConflictError("t1", "s1"))
    assert (await limiter.release("acme", first.reservation_id))[0] == 1
    fresh = await limiter.check(request("s1", 900))  # released: the step reserves anew
    assert (fresh.replayed, fresh.verdict.granted) == (False, 900)


async def test_a_step_that_reserved_nothing_is_decided_anew(async_redis: Redis) -> None:
    await async_redis.flushall()
    limiter = make_limiter(async_redis, lambda: LADDER, lambda: NOW)
    denied = await limiter.check(request("s1", 2000, task_type="plain", task_ceiling=100))
    assert denied.verdict.decision is Decision.DENY
    assert not denied.reservation_id
    again = await limiter.check(request("s1", 50, task_type="plain"))  # another request: no record, no refusal
    assert (again.replayed, again.verdict.decision, again.verdict.granted) == (False, Decision.ALLOW, 50)


async def test_a_lapsed_step_reserves_anew(async_redis: Redis) -> None:
    await async_redis.flushall()
    clock = Clock()
    limiter = make_limiter(async_redis, lambda: LADDER, clock)
    first = await limiter.check(request("s1", 500, lease_seconds=60))
    clock.now += 61_000
    again = await limiter.check(request("s1", 700))
    assert (again.replayed, again.verdict.granted) == (False, 700)
    assert again.lease_expires_ms != first.lease_expires_ms
