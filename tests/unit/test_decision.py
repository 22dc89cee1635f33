"""The pure decision rules, table-driven: no Redis here."""

from __future__ import annotations

import gc
import weakref
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from budgetwarden.domain._decision import (
    Bound,
    CheckPlan,
    Planner,
    StoreOutcome,
    decide,
    fits,
    simulate,
)
from budgetwarden.domain._model import (
    Amount,
    CheckInput,
    Counter,
    Decision,
    Reason,
    ScopeKind,
    StoreStatus,
    Thresholds,
    Unit,
    Verdict,
)
from budgetwarden.domain._policy import Policy, parse_policy

NOW = int(datetime(2026, 11, 27, 8, 30, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
POLICY_TEXT = """
unknown_tenants: reject
tenants:
  acme:
    time_zone: UTC
    windows:
      minute: {tokens: 500}
      day: {tokens: 10000}
  open: {}
default_model: {}
default_task_type: general
task_types:
  general:
    per_task: {tokens: 1000}
    per_step: {tokens: 300}
  unbounded: {}
"""
POLICY = parse_policy(POLICY_TEXT, "test").policy

LADDER = parse_policy(
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
""",
    "ladder",
).policy


def request(
    tokens: int = 100,
    *,
    output: int = 0,
    tenant: str = "acme",
    task_type: str = "",
    ceiling: int | None = None,
    model: str = "m",
    tools: int = 0,
) -> CheckInput:
    return CheckInput(
        tenant_id=tenant,
        task_id="task",
        step_id="step",
        task_type=task_type,
        model=model,
        input_tokens=tokens,
        output_tokens=output,
        tool_calls=tools,
        task_ceiling=ceiling,
    )


def plan(req: CheckInput, policy: Policy = POLICY) -> CheckPlan:
    return Planner().plan_check(policy, req, NOW)


def run(p: CheckPlan, counters: tuple[Counter, ...], thresholds: Thresholds | None = None) -> Verdict:
    """The store's half done by the pure simulation of lua/check.lua, then the decision."""
    return decide(p, simulate(p, counters, thresholds or Thresholds()), NOW)


def counters(task: tuple[int, int], day: tuple[int, int], minute: tuple[int, int]) -> tuple[Counter, ...]:
    return (
        Counter(limit=1000, used=task[0], reserved=task[1]),
        Counter(limit=10000, used=day[0], reserved=day[1]),
        Counter(limit=500, used=minute[0], reserved=minute[1]),
    )


# --- planning --------------------------------------------------------------------------------------------------


def test_plan_lists_task_then_windows_longest_first() -> None:
    p = plan(request())
    assert [s.name for s in p.counted] == ["task", "tenant.day", "tenant.minute"]
    assert [s.limit for s in p.counted] == [1000, 10000, 500]
    assert p.step is not None
    assert p.step.limit == 300
    assert [(c.amount, c.bound, c.rung) for c in p.candidates] == [(Amount(100, 0), Bound.SOFT, None)]
    assert p.task_type == "general"


def test_requested_is_input_plus_output() -> None:
    assert plan(request(120, output=80)).requested.tokens == 200


@pytest.mark.parametrize(("tokens", "count"), [(300, 1), (301, 0)])
def test_step_cap_exactly_and_one_over(tokens: int, count: int) -> None:
    assert len(plan(request(tokens)).candidates) == count


@pytest.mark.parametrize(("ceiling", "expected"), [(None, 1000), (400, 400), (1000, 1000), (5000, 1000)])
def test_explicit_ceiling_is_never_above_the_policy(ceiling: int | None, expected: int) -> None:
    assert plan(request(ceiling=ceiling)).counted[0].limit == expected


def test_explicit_ceiling_applies_to_unbounded_task_types() -> None:
    assert plan(request(task_type="unbounded", ceiling=77)).counted[0].limit == 77
    assert plan(request(task_type="unbounded")).counted[0].limit is None


def test_unknown_tenant_is_denied_without_the_store() -> None:
    p = plan(request(tenant="stranger"))
    assert p.early is not None
    assert (p.early.decision, p.early.reason) == (Decision.DENY, Reason.UNKNOWN_TENANT)
    assert decide(p, StoreOutcome(status=StoreStatus.NOTHING, fitted=None, counters=()), NOW) == p.early


def test_unknown_task_type_without_default_is_denied() -> None:
    policy = parse_policy("task_types: {a: {}}\n", "p").policy
    p = Planner().plan_check(policy, request(task_type="b"), NOW)
    assert p.early is not None
    assert p.early.reason is Reason.UNKNOWN_TASK_TYPE


def test_ladder_candidates_are_cumulative_and_priced_per_model() -> None:
    p = plan(request(1000, output=1000, model="big", tools=3), LADDER)
    assert [(c.rung, c.bound, c.shape.model, c.shape.tokens, c.shape.tool_calls) for c in p.candidates] == [
        (None, Bound.SOFT, "big", 2000, 3),
        ("cheaper", Bound.CHECKPOINT, "small", 2000, 3),
        ("shorter", Bound.CHECKPOINT, "small", 1200, 3),
        ("tiny", Bound.CHECKPOINT, "small", 700, 1),
        (None, Bound.CHECKPOINT, "big", 2000, 3),
    ]
    # big: 1000 * $10 + 1000 * $30 per Mtok = $0.04; small: 1000 * $1 + 1000 * $2 = $0.003
    assert [c.amount.usd for c in p.candidates] == [40_000, 3_000, 1_400, 900, 40_000]
    assert not p.model_assumed


def test_a_rung_that_changes_nothing_is_skipped() -> None:
    p = plan(request(100, output=100, model="small"), LADDER)  # no degrade_to, output under 200, context under 500
    assert [c.rung for c in p.candidates] == [None, None]


def test_unknown_model_is_priced_by_default_and_said_so() -> None:
    p = plan(request(1000, model="mystery"), LADDER)
    assert p.model_assumed
    assert p.requested.usd == 15_000  # the built-in default: $15 per million input tokens
    assert not plan(request(1000, model="big"), LADDER).model_assumed


# --- the fit rule -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "used", "reserved", "amount", "expected"),
    [
        (None, 10**15, 10**15, 10**9, True),
        (1000, 0, 0, 1000, True),  # exactly at the limit
        (1000, 0, 0, 1001, False),  # one over
        (1000, 600, 300, 100, True),
        (1000, 600, 300, 101, False),
        (1000, 1200, 0, 0, False),  # already overspent by reports: even nothing does not fit
        (0, 0, 0, 0, True),
    ],
)
def test_fit_rule(limit: int | None, used: int, reserved: int, amount: int, expected: bool) -> None:
    assert fits(Counter(limit=limit, used=used, reserved=reserved), amount) is expected


@pytest.mark.parametrize(
    ("counter", "amount", "expected"),
    [
        (
            Counter(limit=None, used=0, reserved=0, limit_usd=1000, used_usd=500, reserved_usd=0),
            Amount(10**9, 500),
            True,
        ),
        (Counter(limit=None, used=0, reserved=0, limit_usd=1000, used_usd=500, reserved_usd=0), Amount(1, 501), False),
        (Counter(limit=100, used=0, reserved=0, limit_usd=None), Amount(100, 10**12), True),
        (Counter(limit=100, used=0, reserved=0, limit_usd=1000, used_usd=0, reserved_usd=0), Amount(101, 1), False),
    ],
)
def test_fit_rule_in_both_units(counter: Counter, amount: Amount, expected: bool) -> None:
    assert fits(counter, amount) is expected


# --- allow and deny ---------------------------------------------------------------------------------------------


def test_allow_when_it_fits() -> None:
    verdict = run(plan(request(100)), counters((0, 0), (0, 0), (0, 0)))
    assert (verdict.decision, verdict.reason, verdict.granted) == (Decision.ALLOW, Reason.WITHIN_BUDGET, 100)
    assert verdict.binding_scope == ""


@pytest.mark.parametrize(
    ("task", "day", "minute", "binding", "reason", "retry_after_ms"),
    [
        ((901, 0), (0, 0), (0, 0), "task", Reason.TASK_BUDGET_EXHAUSTED, None),
        ((0, 950), (0, 0), (0, 0), "task", Reason.TASK_BUDGET_EXHAUSTED, None),
        ((0, 0), (9901, 0), (0, 0), "tenant.day", Reason.TENANT_WINDOW_EXHAUSTED, 15.5 * 3_600_000),
        ((0, 0), (0, 0), (401, 0), "tenant.minute", Reason.TENANT_WINDOW_EXHAUSTED, 60_000),
        # Several scopes fail: the one that frees up last binds (the task never frees up).
        ((901, 0), (9901, 0), (401, 0), "task", Reason.TASK_BUDGET_EXHAUSTED, None),
        ((0, 0), (9901, 0), (401, 0), "tenant.day", Reason.TENANT_WINDOW_EXHAUSTED, 15.5 * 3_600_000),
    ],
)
def test_deny_names_the_binding_scope(
    task: tuple[int, int],
    day: tuple[int, int],
    minute: tuple[int, int],
    binding: str,
    reason: Reason,
    retry_after_ms: float | None,
) -> None:
    verdict = run(plan(request(100)), counters(task, day, minute))
    assert verdict.decision is Decision.DENY
    assert verdict.granted == 0
    assert (verdict.binding_scope, verdict.reason, verdict.binding_unit) == (binding, reason, Unit.TOKENS)
    assert verdict.retry_after_ms == retry_after_ms
    assert binding in verdict.message


def test_exactly_at_the_limit_is_allowed_and_one_more_is_not() -> None:
    assert run(plan(request(100)), counters((900, 0), (9900, 0), (400, 0))).decision is Decision.ALLOW
    assert run(plan(request(101)), counters((900, 0), (9900, 0), (400, 0))).binding_scope == "task"


def test_no_retry_after_when_the_step_could_never_fit_the_window() -> None:
    text = "tenants: {a: {windows: {minute: {tokens: 50}}}}\ndefault_task_type: t\ntask_types: {t: {}}\n"
    p = Planner().plan_check(parse_policy(text, "p").policy, request(60, tenant="a"), NOW)
    verdict = run(p, (Counter(limit=None, used=0, reserved=0), Counter(limit=50, used=0, reserved=0)))
    assert verdict.binding_scope == "tenant.minute"
    assert verdict.retry_after_ms is None


def test_step_cap_denial() -> None:
    verdict = run(plan(request(301)), counters((0, 0), (0, 0), (0, 0)))
    assert (verdict.decision, verdict.reason) == (Decision.DENY, Reason.STEP_CAP_EXCEEDED)
    assert verdict.binding_scope == "step"
    assert "301" in verdict.message
    assert "300" in verdict.message


def test_window_scopes_carry_their_span() -> None:
    day = plan(request()).counted[1]
    assert day.kind is ScopeKind.TENANT_WINDOW
    assert day.span is not None
    assert day.span.label == "2026-11-27"


# --- degrade, checkpoint, cost ----------------------------------------------------------------------------------

THRESHOLDS = Thresholds(5000, 9000)  # soft 50%, checkpoint 90% of the 10,000-token / $0.50 task ceiling


def ladder_counters(task_used: int = 0, task_usd: int = 0, day_used: int = 0, day_usd: int = 0) -> tuple[Counter, ...]:
    return (
        Counter(limit=10000, used=task_used, reserved=0, limit_usd=500_000, used_usd=task_usd, reserved_usd=0),
        Counter(limit=100000, used=day_used, reserved=0, limit_usd=1_000_000, used_usd=day_usd, reserved_usd=0),
    )


def big(tokens: int = 1000, output: int = 1000, tools: int = 3) -> CheckPlan:
    return plan(request(tokens, output=output, model="big", tools=tools), LADDER)


@pytest.mark.parametrize(
    ("task_used", "decision", "rung"),
    [
        (3000, Decision.ALLOW, ""),  # 3000 + 2000 = 5000: exactly at the soft threshold stays an allow
        (3001, Decision.DEGRADE, "cheaper"),  # one over: the first rung
    ],
)
def test_soft_threshold_exactly_and_one_over(task_used: int, decision: Decision, rung: str) -> None:
    verdict = run(big(), ladder_counters(task_used), THRESHOLDS)
    assert verdict.decision is decision
    assert (verdict.advice.rung if verdict.advice else "") == rung
    if decision is Decision.DEGRADE:
        assert verdict.reason is Reason.SOFT_THRESHOLD
        assert verdict.binding_scope == "task"
        assert verdict.advice is not None
        assert verdict.advice.model == "small"
        assert verdict.granted == 2000  # same tokens, cheaper model
        assert verdict.granted_usd == 3_000


def test_degrade_advice_of_a_later_rung() -> None:
    # 7600 used: cheaper (2000) would reach 9600 > 9000 checkpoint line; shorter (1200) reaches 8800: fits.
    verdict = run(big(), ladder_counters(7600), THRESHOLDS)
    assert verdict.decision is Decision.DEGRADE
    assert verdict.advice is not None
    assert (verdict.advice.rung, verdict.advice.model, verdict.advice.max_output_tokens) == ("shorter", "small", 200)
    assert verdict.advice.max_context_tokens == 0
    assert verdict.advice.max_tool_calls is None
    assert verdict.granted == 1200


def test_a_rung_that_fits_exactly() -> None:
    verdict = run(big(), ladder_counters(7800), THRESHOLDS)  # 7800 + 1200 = 9000: exactly the checkpoint line
    assert verdict.advice is not None
    assert verdict.advice.rung == "shorter"
    verdict = run(big(), ladder_counters(7801), THRESHOLDS)  # one more: the next rung (700 tokens)
    assert verdict.advice is not None
    assert (verdict.advice.rung, verdict.advice.max_context_tokens, verdict.advice.max_tool_calls) == ("tiny", 500, 1)


def test_no_rung_fits_opens_a_checkpoint() -> None:
    outcome = simulate(big(), ladder_counters(8301), THRESHOLDS)  # even 700 tokens pass 9000
    assert outcome.status is StoreStatus.CHECKPOINT
    verdict = decide(
        big(),
        StoreOutcome(
            status=StoreStatus.CHECKPOINT,
            fitted=None,
            counters=ladder_counters(8301),
            thresholds=THRESHOLDS,
            checkpoint_id="ck1.a",
        ),
        NOW,
    )
    assert (verdict.decision, verdict.reason, verdict.checkpoint_id) == (
        Decision.CHECKPOINT,
        Reason.CHECKPOINT_REQUIRED,
        "ck1.a",
    )
    assert verdict.granted == 0


def test_no_rung_fits_and_no_checkpoint_threshold_denies() -> None:
    verdict = run(big(), ladder_counters(9400), Thresholds(5000, None))
    assert (verdict.decision, verdict.reason, verdict.binding_scope) == (
        Decision.DENY,
        Reason.TASK_BUDGET_EXHAUSTED,
        "task",
    )


def test_window_blocks_every_rung_denies_instead_of_checkpoint() -> None:
    verdict = run(big(), ladder_counters(0, 0, 99_400), THRESHOLDS)
    assert (verdict.decision, verdict.reason, verdict.binding_scope) == (
        Decision.DENY,
        Reason.TENANT_WINDOW_EXHAUSTED,
        "tenant.day",
    )
    assert verdict.retry_after_ms is not None


def test_request_does_not_fit_as_asked_but_a_rung_does() -> None:
    # The day window has room for 1200 tokens only: the request as asked (2000) does not fit it, "shorter" does.
    verdict = run(big(), ladder_counters(0, 0, 98_800), THRESHOLDS)
    assert (verdict.decision, verdict.reason, verdict.binding_scope) == (
        Decision.DEGRADE,
        Reason.DEGRADED_TO_FIT,
        "tenant.day",
    )
    assert verdict.granted == 1200  # a partial grant is a degrade, never an allow


def test_step_cap_can_be_met_by_a_rung() -> None:
    p = plan(request(2000, output=2000, model="big"), LADDER)  # 4000 > the 3000 step cap as asked
    assert [c.rung for c in p.candidates] == ["shorter", "tiny"]
    verdict = run(p, ladder_counters(), THRESHOLDS)
    assert (verdict.decision, verdict.reason) == (Decision.DEGRADE, Reason.DEGRADED_TO_FIT)
    assert verdict.advice is not None
    assert verdict.advice.max_output_tokens == 200


@pytest.mark.parametrize(
    ("task_usd", "day_usd", "binding"),
    [
        (470_000, 0, "task"),  # tokens fit everywhere; the task's $0.50 does not fit $0.04 more
        (0, 996_000, "tenant.day"),  # the day's $1.00 does not fit $0.04 more, but $0.003 more
    ],
)
def test_cost_limit_binds_when_tighter(task_usd: int, day_usd: int, binding: str) -> None:
    verdict = run(big(), ladder_counters(0, task_usd, 0, day_usd), Thresholds())
    assert (verdict.decision, verdict.reason) == (Decision.DEGRADE, Reason.DEGRADED_TO_FIT)
    assert (verdict.binding_scope, verdict.binding_unit) == (binding, Unit.USD)
    assert "cost limit" in verdict.message
    assert verdict.advice is not None
    assert verdict.advice.model == "small"  # the cheaper model is what makes it fit


def test_cost_denial_names_dollars() -> None:
    verdict = run(big(), ladder_counters(0, 499_500), Thresholds())  # even the cheapest rung costs $0.0009
    assert (verdict.decision, verdict.binding_scope, verdict.binding_unit) == (Decision.DENY, "task", Unit.USD)
    assert "$0.499500 of $0.500000" in verdict.message


def test_token_limit_binds_when_tighter() -> None:
    verdict = run(big(), ladder_counters(9500, 0), Thresholds())
    assert (verdict.binding_scope, verdict.binding_unit) == ("task", Unit.TOKENS)


def test_store_states_closed_and_replayed() -> None:
    closed = decide(big(), StoreOutcome(status=StoreStatus.CLOSED, fitted=None, counters=ladder_counters()), NOW)
    assert (closed.decision, closed.reason) == (Decision.DENY, Reason.TASK_CLOSED)


def test_a_planner_keeps_no_earlier_policy_alive_across_reloads() -> None:
    """Each reload parses new tenant and task-type objects; a planner's caches must not hold the old ones (the soak saw
    the sidecar's memory grow with every reload until a bound of 4,096 entries)."""
    planner = Planner()
    texts = [POLICY_TEXT.replace("minute: {tokens: 500}", f"minute: {{tokens: {500 + n}}}") for n in range(20)]
    earlier: list[weakref.ref[Policy]] = []
    for n, text in enumerate(texts):
        policy = parse_policy(text, f"reload {n}").policy
        plan = planner.plan_check(policy, request(10, tenant="acme"), NOW)
        assert plan.counted[2].limit == 500 + n  # the minute window of this reload, not a cached earlier one
        earlier.append(weakref.ref(policy))
        del policy, plan
    gc.collect()
    assert [ref() is None for ref in earlier] == [True] * 19 + [False]
