"""The decision rules, in one place and pure: policy + counters + request in, decision out. No I/O.

A check runs in two halves around one atomic store call:

1. ``plan_check`` turns the request and the policy into the scopes to charge and the candidate amounts to try.
2. The store reserves the first candidate that fits every scope, atomically, and returns every scope's counter.
3. ``decide`` turns what the store did into a decision, a reason and a message.
"""

from __future__ import annotations

from dataclasses import dataclass

from budgetwarden._model import (
    CheckInput,
    Counter,
    Decision,
    Reason,
    Scope,
    ScopeKind,
    Verdict,
    Window,
)
from budgetwarden._policy import Policy, TaskTypePolicy, TenantPolicy
from budgetwarden._windows import SpanCache

TASK_SCOPE = "task"
STEP_SCOPE = "step"
WINDOW_SCOPE_NAMES = {
    Window.MINUTE: "tenant.minute",
    Window.HOUR: "tenant.hour",
    Window.DAY: "tenant.day",
    Window.MONTH: "tenant.month",
}


@dataclass(frozen=True, slots=True)
class CheckPlan:
    """What to ask the store for one check.

    ``counted`` are the scopes with counters, in binding order: the task first, then the tenant's windows from the
    longest to the shortest (the first one that does not fit is the one that frees up last). ``task_limit`` is the
    ceiling a new task starts with. ``candidates`` are the amounts to try, in order; none means "only read".
    ``early`` is set when the answer is known without the store (unknown tenant or task type).
    """

    requested: int
    task_type: str
    task_limit: int | None
    lease_seconds: int | None
    counted: tuple[Scope, ...]
    step: Scope | None
    candidates: tuple[int, ...]
    early: Verdict | None = None


class Planner:
    """Builds check plans; keeps a cache of the current calendar windows (plain memo, still pure in effect)."""

    __slots__ = ("_spans",)

    def __init__(self) -> None:
        self._spans = SpanCache()

    def window_scopes(self, tenant: TenantPolicy, now_ms: int) -> tuple[Scope, ...]:
        scopes = [
            Scope(
                WINDOW_SCOPE_NAMES[window],
                ScopeKind.TENANT_WINDOW,
                limit,
                self._spans.get(window, tenant.time_zone, now_ms),
            )
            for window, limit in tenant.window_limits()
        ]
        scopes.reverse()
        return tuple(scopes)

    def plan_check(self, policy: Policy, request: CheckInput, now_ms: int) -> CheckPlan:
        requested = request.requested
        tenant = policy.tenant(request.tenant_id)
        if tenant is None:
            verdict = Verdict(
                Decision.DENY,
                Reason.UNKNOWN_TENANT,
                0,
                f"tenant {request.tenant_id!r} is not in the policy and the policy rejects unknown tenants",
            )
            return CheckPlan(requested, request.task_type, None, None, (), None, (), verdict)
        resolved = policy.task_type(request.task_type)
        if resolved is None:
            verdict = Verdict(
                Decision.DENY,
                Reason.UNKNOWN_TASK_TYPE,
                0,
                f"task type {request.task_type!r} is not in the policy and the policy has no default task type",
            )
            return CheckPlan(requested, request.task_type, None, None, (), None, (), verdict)
        task_type, rules = resolved
        task_limit = _task_limit(rules, request.task_ceiling)
        counted = (Scope(TASK_SCOPE, ScopeKind.TASK, task_limit), *self.window_scopes(tenant, now_ms))
        step_cap = rules.per_step.tokens
        step = None if step_cap is None else Scope(STEP_SCOPE, ScopeKind.STEP, step_cap)
        fits_step = step_cap is None or requested <= step_cap
        candidates = (requested,) if fits_step else ()
        return CheckPlan(requested, task_type, task_limit, rules.lease_seconds, counted, step, candidates)


def _task_limit(rules: TaskTypePolicy, explicit: int | None) -> int | None:
    """An explicit ceiling is honoured, but never above what the policy allows."""
    policy_limit = rules.per_task.tokens
    if explicit is None:
        return policy_limit
    return explicit if policy_limit is None else min(explicit, policy_limit)


def fits(counter: Counter, amount: int) -> bool:
    """The one fit rule. The Lua script applies the same rule atomically (lua/check.lua)."""
    return counter.limit is None or counter.used + counter.reserved + amount <= counter.limit


def decide(plan: CheckPlan, fitted: int | None, counters: tuple[Counter, ...], now_ms: int) -> Verdict:
    """The decision for a plan, given which candidate the store reserved (if any) and the counters it read.

    ``counters`` belong to ``plan.counted``, in order; when a candidate was reserved they include it.
    """
    if plan.early is not None:
        return plan.early
    if fitted is not None:
        granted = plan.candidates[fitted]
        return Verdict(Decision.ALLOW, Reason.WITHIN_BUDGET, granted, f"allowed {granted} tokens")
    requested = plan.requested
    if plan.step is not None and plan.step.limit is not None and requested > plan.step.limit:
        return Verdict(
            Decision.DENY,
            Reason.STEP_CAP_EXCEEDED,
            0,
            f"step asks for {requested} tokens, above the per-step cap of {plan.step.limit}",
            STEP_SCOPE,
        )
    for scope, counter in zip(plan.counted, counters, strict=True):
        if fits(counter, requested):
            continue
        held = counter.used + counter.reserved
        if scope.kind is ScopeKind.TASK:
            return Verdict(
                Decision.DENY,
                Reason.TASK_BUDGET_EXHAUSTED,
                0,
                f"task budget exhausted: {held} of {counter.limit} tokens used or reserved, step asks for {requested}",
                scope.name,
            )
        assert scope.span is not None
        assert counter.limit is not None
        # Waiting helps only if the step could fit an empty window at all.
        retry_after = scope.span.end_ms - now_ms if requested <= counter.limit else None
        return Verdict(
            Decision.DENY,
            Reason.TENANT_WINDOW_EXHAUSTED,
            0,
            f"{scope.name} window {scope.span.label} exhausted: {held} of {counter.limit} tokens used or reserved, "
            f"step asks for {requested}",
            scope.name,
            retry_after,
        )
    # The store reserved nothing although every scope fits: only possible when there was nothing to try.
    return Verdict(Decision.DENY, Reason.STEP_CAP_EXCEEDED, 0, "nothing was requested within the step cap", STEP_SCOPE)
