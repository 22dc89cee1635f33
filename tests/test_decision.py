"""The pure decision rules, table-driven: no Redis here."""

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from budgetwarden._decision import Planner, decide, fits
from budgetwarden._model import CheckInput, Counter, Decision, Reason, ScopeKind
from budgetwarden._policy import parse_policy

NOW = int(datetime(2026, 11, 27, 8, 30, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
POLICY = parse_policy(
    """
unknown_tenants: reject
tenants:
  acme:
    time_zone: UTC
    windows:
      minute: {tokens: 500}
      day: {tokens: 10000}
  open: {}
default_task_type: general
task_types:
  general:
    per_task: {tokens: 1000}
    per_step: {tokens: 300}
  unbounded: {}
""",
    "test",
).policy


def request(tokens: int = 100, *, tenant: str = "acme", task_type: str = "", ceiling: int | None = None) -> CheckInput:
    return CheckInput(tenant, "task", "step", task_type, "m", tokens, 0, 0, task_ceiling=ceiling)


def plan(req: CheckInput):  # type: ignore[no-untyped-def]
    return Planner().plan_check(POLICY, req, NOW)


def test_plan_lists_task_then_windows_longest_first() -> None:
    p = plan(request())
    assert [s.name for s in p.counted] == ["task", "tenant.day", "tenant.minute"]
    assert [s.limit for s in p.counted] == [1000, 10000, 500]
    assert p.step is not None
    assert p.step.limit == 300
    assert p.candidates == (100,)
    assert p.task_type == "general"


def test_requested_is_input_plus_output() -> None:
    req = CheckInput("acme", "t", "s", "", "m", 120, 80, 0)
    assert req.requested == 200
    assert plan(req).candidates == (200,)


@pytest.mark.parametrize(("tokens", "candidates"), [(300, (300,)), (301, ())])
def test_step_cap_exactly_and_one_over(tokens: int, candidates: tuple[int, ...]) -> None:
    assert plan(request(tokens)).candidates == candidates


@pytest.mark.parametrize(
    ("ceiling", "expected"),
    [(None, 1000), (400, 400), (1000, 1000), (5000, 1000)],
)
def test_explicit_ceiling_is_never_above_the_policy(ceiling: int | None, expected: int) -> None:
    assert plan(request(ceiling=ceiling)).task_limit == expected


def test_explicit_ceiling_applies_to_unbounded_task_types() -> None:
    assert plan(request(task_type="unbounded", ceiling=77)).task_limit == 77
    assert plan(request(task_type="unbounded")).task_limit is None


def test_unknown_tenant_is_denied_without_the_store() -> None:
    p = plan(request(tenant="stranger"))
    assert p.early is not None
    assert (p.early.decision, p.early.reason) == (Decision.DENY, Reason.UNKNOWN_TENANT)
    assert decide(p, None, (), NOW) == p.early


def test_unknown_task_type_without_default_is_denied() -> None:
    policy = parse_policy("task_types: {a: {}}\n", "p").policy
    p = Planner().plan_check(policy, request(task_type="b"), NOW)
    assert p.early is not None
    assert p.early.reason is Reason.UNKNOWN_TASK_TYPE


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
    assert fits(Counter(limit, used, reserved), amount) is expected


def counters(task: tuple[int, int], day: tuple[int, int], minute: tuple[int, int]) -> tuple[Counter, ...]:
    return (Counter(1000, *task), Counter(10000, *day), Counter(500, *minute))


def test_allow_when_the_store_reserved() -> None:
    p = plan(request(100))
    verdict = decide(p, 0, counters((0, 100), (0, 100), (0, 100)), NOW)
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
    verdict = decide(plan(request(100)), None, counters(task, day, minute), NOW)
    assert verdict.decision is Decision.DENY
    assert verdict.granted == 0
    assert (verdict.binding_scope, verdict.reason) == (binding, reason)
    assert verdict.retry_after_ms == retry_after_ms
    assert binding in verdict.message


def test_exactly_at_the_limit_is_allowed_by_the_same_rule_the_store_uses() -> None:
    p = plan(request(100))
    read = counters((900, 0), (9900, 0), (400, 0))
    assert all(fits(counter, 100) for counter in read)
    one_over = counters((901, 0), (9900, 0), (400, 0))
    assert [fits(counter, 100) for counter in one_over] == [False, True, True]
    assert decide(p, None, one_over, NOW).binding_scope == "task"


def test_no_retry_after_when_the_step_could_never_fit_the_window() -> None:
    policy = parse_policy(
        "tenants: {a: {windows: {minute: {tokens: 50}}}}\ndefault_task_type: t\ntask_types: {t: {}}\n", "p"
    )
    p = Planner().plan_check(policy.policy, request(60, tenant="a"), NOW)
    verdict = decide(p, None, (Counter(None, 0, 0), Counter(50, 0, 0)), NOW)
    assert verdict.binding_scope == "tenant.minute"
    assert verdict.retry_after_ms is None


def test_step_cap_denial() -> None:
    p = plan(request(301))
    verdict = decide(p, None, counters((0, 0), (0, 0), (0, 0)), NOW)
    assert (verdict.decision, verdict.reason, verdict.binding_scope) == (
        Decision.DENY,
        Reason.STEP_CAP_EXCEEDED,
        "step",
    )
    assert "301" in verdict.message
    assert "300" in verdict.message


def test_window_scopes_carry_their_span() -> None:
    p = plan(request())
    day = p.counted[1]
    assert day.kind is ScopeKind.TENANT_WINDOW
    assert day.span is not None
    assert day.span.label == "2026-11-27"
