"""Concurrent unary checks share script calls (the limiter's micro-batching: those that arrive while a call is out go
in the next one together), and each is answered exactly as it would be alone: the same decisions as the same checks
one by one without batching, its own refusal, its own deadline and its own fail-mode answer."""

from __future__ import annotations

import asyncio
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings
from redis.asyncio import Redis
from test_check_many import NOW, POLICY, checks, comparable

from budgetwarden.domain._model import CheckInput, Decision, Reason
from budgetwarden.limiter import CheckResult, Limiter, StepConflictError
from budgetwarden.store._keys import parse_fail_open_id
from budgetwarden.store._store import BudgetStore

from support import BlackHole


def limiter(redis: Redis, *, batch: bool, **overrides: Any) -> Limiter:
    options: dict[str, Any] = {"clock": lambda: NOW, "check_deadline_s": 30.0, "store_deadline_s": 30.0}
    return Limiter(BudgetStore(redis), lambda: POLICY, batch_unary=batch, **options | overrides)


async def unary(limiter: Limiter, request: CheckInput, deadline_s: float | None = None) -> Any:
    try:
        return await limiter.check(request, deadline_s)
    except StepConflictError as exc:
        return exc


async def script_calls(redis: Redis) -> int:
    """Script calls Valkey has run so far (EVALSHA, and EVAL for a script it did not know yet)."""
    stats = await redis.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


def step(step_id: str, tenant: str = "acme", tokens: int = 100) -> CheckInput:
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


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(checks, min_size=1, max_size=25))
async def test_concurrent_unary_checks_decide_what_one_by_one_checks_decide(
    async_redis: Redis, requests: list[CheckInput]
) -> None:
    """All the checks arrive together (gather starts them in order): the first is decided alone, the others in one
    batch after it, in that order; one by one, without batching, in the same order. Replays, conflicts, early answers
    (a step over its per-step limit) and every decision occur in the drawn checks."""
    await async_redis.flushall()
    alone = limiter(async_redis, batch=False)
    one_by_one = [comparable(await unary(alone, request)) for request in requests]
    await async_redis.flushall()
    batched = limiter(async_redis, batch=True)
    together = [comparable(answer) for answer in await asyncio.gather(*(unary(batched, r) for r in requests))]
    assert together == one_by_one


async def test_concurrent_unary_checks_share_a_store_call(async_redis: Redis) -> None:
    """16 checks of one tenant arriving together: the first is decided at once, alone; the 15 that arrive while its
    call is out share the next one. Without batching, 16 calls."""
    counts = {}
    for batch in (True, False):
        await async_redis.flushall()
        checker = limiter(async_redis, batch=batch)
        await unary(checker, step(f"warm-{batch}"))  # the script is loaded (a first EVALSHA may be followed by EVAL)
        before = await script_calls(async_redis)
        answers = await asyncio.gather(*(unary(checker, step(f"{batch}-{i}")) for i in range(16)))
        counts[batch] = await script_calls(async_redis) - before
        assert all(isinstance(a, CheckResult) and a.verdict.decision is Decision.ALLOW for a in answers), answers
        assert len({a.reservation_id for a in answers}) == 16
    assert counts == {True: 2, False: 16}


async def test_a_batch_makes_one_store_call_per_tenant(async_redis: Redis) -> None:
    await async_redis.flushall()
    checker = limiter(async_redis, batch=True)
    await unary(checker, step("warm"))
    before = await script_calls(async_redis)
    tenants = ["acme", "globex", "acme", "globex", "initech", "acme"]
    answers = await asyncio.gather(*(unary(checker, step(f"s{i}", tenant)) for i, tenant in enumerate(tenants)))
    # s0 alone, then the five that waited for it: one call for each of their three tenants
    assert await script_calls(async_redis) - before == 4
    assert all(isinstance(a, CheckResult) and not a.from_fail_mode for a in answers)


async def test_a_refusal_in_a_batch_is_only_its_own(async_redis: Redis) -> None:
    """The same step checked again with another request in the same batch: that check alone is refused."""
    await async_redis.flushall()
    checker = limiter(async_redis, batch=True)
    first, other, replay, next_step = await asyncio.gather(
        unary(checker, step("a")), unary(checker, step("a", tokens=200)), unary(checker, step("a")),
        unary(checker, step("b")),
    )  # fmt: skip
    assert isinstance(first, CheckResult)
    assert not first.replayed
    assert isinstance(other, StepConflictError)
    assert isinstance(replay, CheckResult)
    assert replay.replayed
    assert replay.reservation_id == first.reservation_id
    assert isinstance(next_step, CheckResult)
    assert next_step.verdict.decision is Decision.ALLOW


@pytest.mark.parametrize("first", ["short", "long"])
async def test_each_check_keeps_its_own_deadline_and_fail_mode(black_hole: BlackHole, first: str) -> None:
    """Redis never answers. Whichever arrives first (and so is sent alone, the other waiting for its call), the check
    with the short deadline gets its fail-mode answer first, while the one with the long deadline still waits; each
    answer names its own step."""
    redis = Redis(host="127.0.0.1", port=black_hole.port, socket_timeout=60)
    try:
        checker = limiter(redis, batch=True, fail_mode="open", check_deadline_s=30.0)
        finished: list[str] = []

        async def check(step_id: str, deadline_s: float) -> CheckResult:
            answer = await checker.check(step(step_id), deadline_s)
            finished.append(step_id)
            return answer

        deadlines = {"short": 0.05, "long": 2.0}
        order = [first, *(name for name in deadlines if name != first)]
        answers = dict(zip(order, await asyncio.gather(*(check(name, deadlines[name]) for name in order)), strict=True))
        short, long = answers["short"], answers["long"]
        assert finished == ["short", "long"]
        for answer, step_id in ((short, "short"), (long, "long")):
            assert answer.from_fail_mode
            assert answer.verdict.reason is Reason.FAIL_OPEN
            grant = parse_fail_open_id(answer.reservation_id)
            assert grant is not None
            assert grant.step_id == step_id
    finally:
        await redis.aclose()


async def test_a_batch_nobody_waits_for_is_cancelled(black_hole: BlackHole) -> None:
    """Redis never answers. The first check waits long; the two behind it give up at their deadlines. Their batch, sent
    when the first one's call ended, is cancelled once both are gone, as their own store calls would be."""
    redis = Redis(host="127.0.0.1", port=black_hole.port, socket_timeout=60)
    try:
        checker = limiter(redis, batch=True, fail_mode="closed", check_deadline_s=30.0)
        leader = asyncio.ensure_future(checker.check(step("first"), 0.2))
        await asyncio.sleep(0)  # the first is sent alone; the next two wait for its call
        behind = [asyncio.ensure_future(checker.check(step(f"behind-{i}"), 0.5)) for i in range(2)]
        answers = await asyncio.gather(leader, *behind)
        assert [answer.from_fail_mode for answer in answers] == [True, True, True]
        batch = checker._batch
        assert batch is not None
        for _ in range(100):  # the cancelled batch task finishes on a later turn
            if not batch._running:
                break
            await asyncio.sleep(0)
        assert not batch._running
    finally:
        await redis.aclose()
