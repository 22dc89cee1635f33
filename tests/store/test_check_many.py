"""Batched checks (one script call per tenant, the path of CheckStream) decide exactly what the same checks decide one
at a time. Hypothesis draws sequences of checks over a few tenants, tasks and steps (repeats included, so replays
happen), with budgets small enough that allow, degrade, checkpoint and deny all occur, and splits them into batches
at random; both runs start from an empty store at the same fixed clock."""

from __future__ import annotations

import itertools
from dataclasses import asdict
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings
from redis.asyncio import Redis

from budgetwarden.domain._model import CheckInput, Decision
from budgetwarden.domain._policy import parse_policy
from budgetwarden.limiter import SCRIPT_BATCH, CheckResult, Limiter, StepConflictError
from budgetwarden.store._store import BudgetStore

NOW = 1_796_000_000_000
POLICY = parse_policy(
    """
tenants:
  acme:
    time_zone: UTC
    windows:
      minute: {tokens: 6000}
      day: {tokens: 9000, usd: 400000}
  globex:
    windows:
      hour: {tokens: 4000}
models:
  big: {input_usd_per_mtok: 10, output_usd_per_mtok: 30, degrade_to: small}
  small: {input_usd_per_mtok: 1, output_usd_per_mtok: 4}
default_task_type: agent
task_types:
  agent:
    per_task: {tokens: 5000}
    per_step: {tokens: 2500}
    soft_threshold: 0.5
    checkpoint_threshold: 0.8
    degrade:
      - {name: cheaper, model: cheaper, max_output_tokens: 300}
      - {name: short, max_context_tokens: 400}
  plain:
    per_task: {tokens: 3000}
""",
    "test",
)

checks = st.builds(
    CheckInput,
    tenant_id=st.sampled_from(["acme", "globex", "initech"]),
    task_id=st.sampled_from(["t1", "t2"]),
    step_id=st.sampled_from(["s1", "s2", "s3", "s4", "s5", "s6"]),
    task_type=st.sampled_from(["", "plain"]),
    model=st.sampled_from(["big", "small", ""]),
    input_tokens=st.integers(0, 3000),
    output_tokens=st.integers(0, 1500),
    tool_calls=st.just(0),
    labels=st.just({}),
    lease_seconds=st.none(),
    task_ceiling=st.one_of(st.none(), st.integers(1, 6000)),
)


def comparable(result: CheckResult | StepConflictError) -> dict[str, Any]:
    """A result as data; a step checked again with another request is refused (the same way in both runs)."""
    if isinstance(result, StepConflictError):
        return {"refused": str(result)}
    return asdict(result)


async def run(redis: Redis, requests: list[CheckInput], cuts: list[int]) -> list[dict[str, Any]]:
    await redis.flushall()
    limiter = Limiter(
        BudgetStore(redis), lambda: POLICY, clock=lambda: NOW, check_deadline_s=30.0, store_deadline_s=30.0
    )
    if not cuts:
        return [comparable((await limiter.check_many([request]))[0]) for request in requests]
    out = []
    bounds = [0, *sorted(set(cuts)), len(requests)]
    for start, end in itertools.pairwise(bounds):
        out += [comparable(result) for result in await limiter.check_many(requests[start:end])]
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(checks, min_size=1, max_size=25), data=st.data())
async def test_batches_decide_what_single_checks_decide(
    async_redis: Redis, requests: list[CheckInput], data: st.DataObject
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(requests)), max_size=4), label="batch cuts")
    one_by_one = await run(async_redis, requests, [])
    batched = await run(async_redis, requests, cuts or [len(requests)])
    assert batched == one_by_one


async def test_the_order_inside_a_batch_is_the_order_of_decisions(async_redis: Redis) -> None:
    """Within one batch, a later check sees what the earlier ones reserved; the same step twice is a replay."""
    await async_redis.flushall()
    limiter = Limiter(
        BudgetStore(async_redis), lambda: POLICY, clock=lambda: NOW, check_deadline_s=30.0, store_deadline_s=30.0
    )

    def step(step_id: str, tokens: int, tenant: str = "acme") -> CheckInput:
        return CheckInput(
            tenant_id=tenant,
            task_id="t1",
            step_id=step_id,
            task_type="plain",
            model="small",
            input_tokens=tokens,
            output_tokens=0,
            tool_calls=0,
        )

    results = await limiter.check_many(
        [step("a", 2000), step("b", 2000), step("a", 2000), step("c", 1000), step("a", 2500, "globex"), step("a", 9)]
    )
    first, second, again, third, other = (r for r in results[:5] if isinstance(r, CheckResult))
    # plain: 3000 tokens per task, no degrade ladder
    assert [r.verdict.decision for r in (first, second, third)] == [Decision.ALLOW, Decision.DENY, Decision.ALLOW]
    assert (again.replayed, again.reservation_id) == (True, first.reservation_id)
    assert isinstance(results[5], StepConflictError)  # the same step with another request
    assert other.verdict.decision is Decision.ALLOW  # another tenant: its own windows and its own task
    task = {scope.name: counter for scope, counter in third.scopes}["task"]
    assert task.reserved == 3000  # a and c; b reserved nothing


async def test_a_batch_larger_than_one_script_call_decides_as_single_checks_do(async_redis: Redis) -> None:
    """Checks beyond SCRIPT_BATCH go in several script calls, in order; the budget runs out across a call boundary."""
    requests = [
        CheckInput(
            tenant_id="acme",
            task_id=f"t{i % 3}",
            step_id=f"s{i}",
            task_type="plain",
            model="small",
            input_tokens=37 + i % 5,
            output_tokens=0,
            tool_calls=0,
        )
        for i in range(250)
    ]
    assert len(requests) > 2 * SCRIPT_BATCH
    one_by_one = await run(async_redis, requests, [])
    batched = await run(async_redis, requests, [len(requests)])
    assert batched == one_by_one
    decisions = [result["verdict"]["decision"] for result in batched]
    assert Decision.ALLOW in decisions[SCRIPT_BATCH:]
    assert Decision.DENY in decisions  # the task ceilings (3,000) and the minute window (6,000) ran out
