"""A CheckStream message's checks whose store call does not answer: each gets its own fail-mode answer, and the
store's failure is logged once per tenant of the call (with the number of checks it answered), not once per check:
under overload, a line per check of a 100-check message cost the sidecar CPU it was short of."""

from __future__ import annotations

import logging

import pytest
from redis.asyncio import Redis
from test_check_many import NOW, POLICY

from budgetwarden.domain._model import CheckInput, Reason
from budgetwarden.limiter import CheckResult, Limiter
from budgetwarden.store._keys import parse_fail_open_id
from budgetwarden.store._store import BudgetStore

from support import BlackHole


def step(step_id: str, tenant: str) -> CheckInput:
    return CheckInput(
        tenant_id=tenant,
        task_id="t1",
        step_id=step_id,
        task_type="plain",
        model="small",
        input_tokens=100,
        output_tokens=0,
        tool_calls=0,
    )


async def test_checks_of_a_call_that_fails_get_their_own_answers_and_one_log_line_per_tenant(
    black_hole: BlackHole, caplog: pytest.LogCaptureFixture
) -> None:
    redis = Redis(host="127.0.0.1", port=black_hole.port, socket_timeout=60)
    try:
        limiter = Limiter(
            BudgetStore(redis), lambda: POLICY, clock=lambda: NOW, fail_mode="open", check_deadline_s=0.05
        )
        requests = [step(f"s{n}", "acme" if n % 3 else "globex") for n in range(30)]
        with caplog.at_level(logging.WARNING, logger="budgetwarden.limiter"):
            answers = await limiter.check_many(requests)
    finally:
        await redis.aclose()
    for request, answer in zip(requests, answers, strict=True):
        assert isinstance(answer, CheckResult)
        assert answer.from_fail_mode
        assert answer.verdict.reason is Reason.FAIL_OPEN
        grant = parse_fail_open_id(answer.reservation_id)
        assert grant is not None
        assert grant.step_id == request.step_id
    lines = [r for r in caplog.records if "fail mode open applies" in r.getMessage()]
    assert sorted((r.tenant_id, r.checks) for r in lines) == [("acme", 20), ("globex", 10)]  # type: ignore[attr-defined]
