"""Which reason a degrade gives (the table in docs/concepts.md), table-driven on the pure rules: no Redis here.

SOFT_THRESHOLD: the request as asked would fit every scope but passes the task's soft threshold.
DEGRADED_TO_FIT: the request as asked does not fit a scope's limit (or the per-step cap, or, for a task type without
a soft threshold, the task's checkpoint line). "As asked" means against the counters before the grant.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetwarden.domain._decision import CheckPlan, Planner, decide, simulate
from budgetwarden.domain._model import CheckInput, Counter, Decision, Reason, Thresholds, Unit, Verdict, threshold_of
from budgetwarden.domain._policy import parse_policy

NOW = int(datetime(2026, 11, 27, 8, 30, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
POLICY = parse_policy(
    """
tenants:
  acme:
    windows:
      day: {tokens: 100000, usd: 1.00}
models:
  big: {input_usd_per_mtok: 10, output_usd_per_mtok: 30, degrade_to: small}
  small: {input_usd_per_mtok: 1, output_usd_per_mtok: 2}
default_task_type: agent
task_types:
  agent:
    per_task: {tokens: 10000, usd: 0.50}
    per_step: {tokens: 3000}
    degrade:
      - {name: cheaper, model: cheaper}
      - {name: shorter, max_output_tokens: 200}
      - {name: tiny, max_context_tokens: 500, max_tool_calls: 1}
""",
    "reasons",
).policy

SOFT_AND_CHECKPOINT = Thresholds(5000, 9000)  # soft 50%, checkpoint 90%
SOFT_ONLY = Thresholds(5000, None)
CHECKPOINT_ONLY = Thresholds(None, 9000)


def plan(tokens: int = 1000, output: int = 1000, *, ceiling: int | None = None) -> CheckPlan:
    """A step on the big model: 2000 tokens for $0.04 as asked by default; its cheaper rung costs $0.003."""
    request = CheckInput(
        tenant_id="acme",
        task_id="task",
        step_id="step",
        task_type="",
        model="big",
        input_tokens=tokens,
        output_tokens=output,
        tool_calls=3,
        task_ceiling=ceiling,
    )
    return Planner().plan_check(POLICY, request, NOW)


def decided(
    p: CheckPlan, thresholds: Thresholds, *, task: tuple[int, int] = (0, 0), day: tuple[int, int] = (0, 0)
) -> Verdict:
    """The store's half by the pure simulation of lua/check.lua (counters after the grant, as the store answers),
    then the decision. ``task`` and ``day`` are (used tokens, used micro-USD) before the check."""
    limit = p.counted[0]
    counters = (
        Counter(
            limit=limit.limit, used=task[0], reserved=0, limit_usd=limit.limit_usd, used_usd=task[1], reserved_usd=0
        ),
        Counter(limit=100_000, used=day[0], reserved=0, limit_usd=1_000_000, used_usd=day[1], reserved_usd=0),
    )
    return decide(p, simulate(p, counters, thresholds), NOW)


CASES = [
    # The case: an explicit 4000-token ceiling (soft line 2000, checkpoint line 3600); 1001 used. As
    # asked, 3001 fits the ceiling but passes the soft line; the cheaper rung (same tokens) fits under 3600.
    ("explicit ceiling", plan(ceiling=4000), SOFT_AND_CHECKPOINT, (1001, 0), (0, 0), "SOFT", "task", Unit.TOKENS),
    # The same with the policy's ceiling: a big step on a task with 6500 of 10000 used (8500 fits the ceiling).
    ("policy ceiling", plan(), SOFT_AND_CHECKPOINT, (6500, 0), (0, 0), "SOFT", "task", Unit.TOKENS),
    # The day window has room for the request as asked (98,500 of 100,000), though not for it twice.
    ("window with room", plan(), SOFT_AND_CHECKPOINT, (3001, 0), (96_500, 0), "SOFT", "task", Unit.TOKENS),
    # Cost: the tokens stay under the soft line (2000 of an explicit 4000), the cost ($0.26 of $0.50) does not.
    ("cost soft line", plan(ceiling=4000), SOFT_AND_CHECKPOINT, (0, 220_000), (0, 0), "SOFT", "task", Unit.USD),
    # Cost without a checkpoint line: $0.458 + $0.04 fits the $0.50 ceiling as asked.
    ("cost, soft only", plan(ceiling=4000), SOFT_ONLY, (0, 458_000), (0, 0), "SOFT", "task", Unit.USD),
    # Without a soft threshold the checkpoint line bounds the request as asked: passing it is not "past the soft
    # threshold". 7001 + 2000 passes 9000 (the ceiling would take it); the shorter rung fits.
    ("checkpoint only", plan(), CHECKPOINT_ONLY, (7001, 0), (0, 0), "FIT", "task", Unit.TOKENS),
    ("checkpoint only, cost", plan(100, 100), CHECKPOINT_ONLY, (0, 447_000), (0, 0), "FIT", "task", Unit.USD),
    # Truly not fitting as asked stays DEGRADED_TO_FIT, with and without an explicit ceiling.
    ("window full", plan(ceiling=4000), SOFT_AND_CHECKPOINT, (0, 0), (98_800, 0), "FIT", "tenant.day", Unit.TOKENS),
    ("ceiling full", plan(ceiling=4000), SOFT_ONLY, (2500, 0), (0, 0), "FIT", "task", Unit.TOKENS),
    ("cost ceiling full", plan(), SOFT_ONLY, (0, 470_000), (0, 0), "FIT", "task", Unit.USD),
    ("step cap", plan(2000, 2000, ceiling=9000), SOFT_AND_CHECKPOINT, (0, 0), (0, 0), "FIT", "step", Unit.TOKENS),
]


@pytest.mark.parametrize(
    ("case", "p", "thresholds", "task", "day", "reason", "binding", "unit"), CASES, ids=[c[0] for c in CASES]
)
def test_degrade_reason(
    case: str,
    p: CheckPlan,
    thresholds: Thresholds,
    task: tuple[int, int],
    day: tuple[int, int],
    reason: str,
    binding: str,
    unit: Unit,
) -> None:
    verdict = decided(p, thresholds, task=task, day=day)
    assert verdict.decision is Decision.DEGRADE, case
    expected = Reason.SOFT_THRESHOLD if reason == "SOFT" else Reason.DEGRADED_TO_FIT
    assert (verdict.reason, verdict.binding_scope, verdict.binding_unit) == (expected, binding, unit), verdict.message
    if expected is Reason.SOFT_THRESHOLD:
        assert "soft threshold" in verdict.message
    else:
        assert f"does not fit the {binding}" in verdict.message


def test_checkpoint_only_names_the_checkpoint_line() -> None:
    verdict = decided(plan(), CHECKPOINT_ONLY, task=(7001, 0))
    assert "checkpoint line" in verdict.message
    assert "soft" not in verdict.message


# --- the rule as a property ----------------------------------------------------------------------------------------


def _as_asked_misfit(p: CheckPlan, before: tuple[Counter, ...], thresholds: Thresholds) -> bool:
    """Does the request as asked miss a line that is not the soft threshold? (docs/concepts.md's table, restated.)"""
    asked = p.requested
    step = p.step
    if step is not None and (
        (step.limit is not None and asked.tokens > step.limit)
        or (step.limit_usd is not None and asked.usd > step.limit_usd)
    ):
        return True
    for index, counter in enumerate(before):
        limit, limit_usd = counter.limit, counter.limit_usd
        if index == 0 and thresholds.soft_bp is None:
            limit = threshold_of(limit, thresholds.checkpoint_bp)
            limit_usd = threshold_of(limit_usd, thresholds.checkpoint_bp)
        if limit is not None and counter.used + counter.reserved + asked.tokens > limit:
            return True
        if limit_usd is not None and counter.used_usd + counter.reserved_usd + asked.usd > limit_usd:
            return True
    return False


@settings(max_examples=400, deadline=None)
@given(
    tokens=st.integers(0, 2000),
    output=st.integers(0, 2000),
    ceiling=st.one_of(st.none(), st.integers(0, 12_000)),
    soft=st.one_of(st.none(), st.integers(1, 10_000)),
    checkpoint=st.one_of(st.none(), st.integers(1, 10_000)),
    task=st.tuples(st.integers(0, 12_000), st.integers(0, 3000), st.integers(0, 600_000), st.integers(0, 50_000)),
    day=st.tuples(st.integers(0, 100_000), st.integers(0, 1_000_000)),
)
def test_a_degrade_says_soft_threshold_exactly_when_the_request_fits_as_asked(
    tokens: int,
    output: int,
    ceiling: int | None,
    soft: int | None,
    checkpoint: int | None,
    task: tuple[int, int, int, int],
    day: tuple[int, int],
) -> None:
    if soft is not None and checkpoint is not None and soft > checkpoint:
        soft, checkpoint = checkpoint, soft  # the policy never allows soft above checkpoint
    thresholds = Thresholds(soft, checkpoint)
    p = plan(tokens, output, ceiling=ceiling)
    limit = p.counted[0]
    before = (
        Counter(
            limit=limit.limit,
            used=task[0],
            reserved=task[1],
            limit_usd=limit.limit_usd,
            used_usd=task[2],
            reserved_usd=task[3],
        ),
        Counter(limit=100_000, used=day[0], reserved=0, limit_usd=1_000_000, used_usd=day[1], reserved_usd=0),
    )
    verdict = decide(p, simulate(p, before, thresholds), NOW)
    if verdict.decision is not Decision.DEGRADE:
        return
    misfit = _as_asked_misfit(p, before, thresholds)
    assert verdict.reason is (Reason.DEGRADED_TO_FIT if misfit else Reason.SOFT_THRESHOLD), verdict.message
    if verdict.reason is Reason.SOFT_THRESHOLD:
        assert soft is not None
        assert verdict.binding_scope == "task"
        assert "soft threshold" in verdict.message
