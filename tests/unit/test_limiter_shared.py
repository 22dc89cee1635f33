"""What the limiter shares between the checks of one call (Limiter._check_many, _finish): a verdict that
``granted_as_asked`` gives for a plan and a reserved candidate is the one ``decide`` gives, whatever the counters, so
the checks of one plan may share it; where it gives None, the counters matter and each check is decided on its own."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from budgetwarden.domain import (
    CheckInput,
    Counter,
    Planner,
    StoreOutcome,
    StoreStatus,
    Thresholds,
    decide,
    granted_as_asked,
    plan_inputs,
)
from budgetwarden.domain._policy import parse_policy

NOW = int(datetime(2026, 11, 27, 8, 30, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
POLICY = parse_policy(
    """
tenants:
  acme:
    windows:
      day: {tokens: 100000, usd: 1.00}
models:
  big: {input_usd_per_mtok: 10, output_usd_per_mtok: 30, cached_input_usd_per_mtok: 5, degrade_to: small}
  small: {input_usd_per_mtok: 1, output_usd_per_mtok: 2}
default_task_type: agent
task_types:
  agent:
    per_task: {tokens: 10000, usd: 0.50}
    per_step: {tokens: 3000}
    soft_threshold: 0.5
    checkpoint_threshold: 0.9
    degrade:
      - {name: cheaper, model: cheaper}
      - {name: shorter, max_output_tokens: 200}
      - {name: tiny, max_context_tokens: 500, max_tool_calls: 1}
  plain:
    per_task: {tokens: 10000}
""",
    "shared",
).policy

COUNTERS = [
    (Counter(limit=10000, used=0, reserved=1000), Counter(limit=100000, used=0, reserved=1000)),
    (Counter(limit=10000, used=4000, reserved=3000), Counter(limit=100000, used=90000, reserved=9000)),
    (
        Counter(limit=10000, used=9500, reserved=400, limit_usd=500000, used_usd=400000),
        Counter(limit=None, used=1, reserved=2),
    ),
]


@pytest.mark.parametrize("task_type", ["agent", "plain"])
@pytest.mark.parametrize(("model", "tokens", "output", "tools"), [("big", 1000, 1000, 3), ("small", 100, 0, 0)])
def test_a_shared_verdict_is_the_one_decide_gives_whatever_the_counters(
    task_type: str, model: str, tokens: int, output: int, tools: int
) -> None:
    request = CheckInput(
        tenant_id="acme",
        task_id="t",
        step_id="s",
        task_type=task_type,
        model=model,
        input_tokens=tokens,
        output_tokens=output,
        tool_calls=tools,
    )
    plan = Planner().plan_check(POLICY, request, NOW)
    assert plan.candidates
    shared_some = False
    for fitted in range(len(plan.candidates)):
        shared = granted_as_asked(plan, fitted)
        assert (shared is None) == (plan.candidates[fitted].rung is not None)
        for counters in COUNTERS:
            for thresholds in (Thresholds(), Thresholds(5000, 9000)):
                outcome = StoreOutcome(
                    status=StoreStatus.RESERVED, fitted=fitted, counters=counters, thresholds=thresholds
                )
                decided = decide(plan, outcome, NOW)
                if shared is not None:
                    shared_some = True
                    assert shared == decided
    assert shared_some


@pytest.mark.parametrize("task_type", ["agent", "plain", "unknown-type"])
@pytest.mark.parametrize("tenant", ["acme", "stranger"])
@pytest.mark.parametrize("ceiling", [None, 500])
def test_checks_that_agree_on_plan_inputs_get_equal_plans(task_type: str, tenant: str, ceiling: int | None) -> None:
    # _check_many shares one plan between the checks of a call with equal plan_inputs: everything else a request holds
    # (its ids, labels, lease) must not change the plan.
    def request(**others: object) -> CheckInput:
        fields: dict[str, object] = {
            "tenant_id": tenant,
            "task_id": "t1",
            "step_id": "s1",
            "task_type": task_type,
            "model": "big",
            "input_tokens": 1000,
            "output_tokens": 500,
            "tool_calls": 2,
            "task_ceiling": ceiling,
        }
        return CheckInput(**{**fields, **others})  # type: ignore[arg-type]

    first = request()
    others = [
        request(task_id="t2"),
        request(step_id="s2"),
        request(labels={"user": "u"}),
        request(lease_seconds=5),
        request(task_id="t3", step_id="s9", labels={"k": "v"}, lease_seconds=60),
    ]
    plan = Planner().plan_check(POLICY, first, NOW)
    for other in others:
        assert plan_inputs(other) == plan_inputs(first)
        assert Planner().plan_check(POLICY, other, NOW) == plan
    # And the key is not blind to what the plan reads.
    for changed in [request(input_tokens=999), request(model="small"), request(task_ceiling=400)]:
        assert plan_inputs(changed) != plan_inputs(first)
