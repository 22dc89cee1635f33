"""The decision rules, in one place and pure: policy + counters + request in, decision out. No I/O.

A check runs in two halves around one atomic store call:

1. ``Planner.plan_check`` turns the request and the policy into the scopes to charge and the candidate amounts to try:
   the request as asked (bounded by the task's soft threshold), then each rung of the degrade ladder (bounded by the
   checkpoint threshold), then the request as asked again when a soft threshold is set.
2. The store reserves the first candidate that fits every scope, atomically (``lua/check.lua`` applies ``fits``), or
   opens a checkpoint when only the task's checkpoint threshold stands in the way.
3. ``decide`` turns what the store did into a decision, a reason, a message and the advice.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace
from operator import attrgetter

from ._cost import estimate_micros, usd_text
from ._model import (
    NO_THRESHOLDS,
    Advice,
    Amount,
    CheckInput,
    Counter,
    Decision,
    Reason,
    Scope,
    ScopeKind,
    StoreStatus,
    Thresholds,
    Unit,
    Verdict,
    Window,
    threshold_of,
)
from ._policy import Policy, Rung, TaskTypePolicy, TenantPolicy
from ._windows import SpanCache

TASK_SCOPE = "task"
STEP_SCOPE = "step"
WINDOW_SCOPE_NAMES = {
    Window.MINUTE: "tenant.minute",
    Window.HOUR: "tenant.hour",
    Window.DAY: "tenant.day",
    Window.MONTH: "tenant.month",
}


def task_scope(counter: Counter) -> Scope:
    """The task's scope with the ceilings its counter holds (the task's first check fixed them)."""
    return Scope(name=TASK_SCOPE, kind=ScopeKind.TASK, limit=counter.limit, limit_usd=counter.limit_usd)


class Bound(enum.IntEnum):
    """Which task threshold bounds a candidate: the request as asked stays under the soft threshold; degraded ones
    (and the request once past the soft threshold) under the checkpoint threshold."""

    SOFT = 0
    CHECKPOINT = 1


@dataclass(slots=True, kw_only=True)
class Shape:
    """A step as it would run: which model, how much context and output, how many tool calls."""

    model: str
    input_tokens: int
    output_tokens: int
    tool_calls: int

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(slots=True)
class Candidate:
    amount: Amount
    bound: Bound
    shape: Shape
    rung: str | None  # None: the request as asked


@dataclass(slots=True, kw_only=True)
class CheckPlan:
    """What to ask the store for one check.

    ``counted`` are the scopes with counters, in binding order: the task first, then the tenant's windows from the
    longest to the shortest (the first one that does not fit is the one that frees up last). The task scope carries
    the ceiling a new task starts with. ``early`` is set when the answer is known without the store.
    """

    requested: Amount
    task_type: str
    thresholds: Thresholds
    lease_seconds: int | None
    counted: tuple[Scope, ...]
    step: Scope | None
    candidates: tuple[Candidate, ...]
    shape: Shape
    model_assumed: bool = False
    early: Verdict | None = None


@dataclass(slots=True, kw_only=True)
class StoreOutcome:
    """What the store reported for a plan: ``counters`` belong to ``plan.counted``, in order, after any grant;
    ``thresholds`` are the task's as stored (fixed by its first check)."""

    status: StoreStatus
    fitted: int | None
    counters: tuple[Counter, ...]
    thresholds: Thresholds = NO_THRESHOLDS
    checkpoint_id: str = ""


def fits(counter: Counter, amount: Amount | int, limit: int | None = None, limit_usd: int | None = None) -> bool:
    """The one fit rule, in both units (``lua/check.lua`` applies the same). Limits default to the counter's."""
    if isinstance(amount, int):
        amount = Amount(amount)
    return _failing_unit(counter, amount, limit, limit_usd) is None


def _failing_unit(
    counter: Counter, amount: Amount, limit: int | None = None, limit_usd: int | None = None
) -> Unit | None:
    tokens_limit = counter.limit if limit is None else limit
    usd_limit = counter.limit_usd if limit_usd is None else limit_usd
    if tokens_limit is not None and counter.used + counter.reserved + amount.tokens > tokens_limit:
        return Unit.TOKENS
    if usd_limit is not None and counter.used_usd + counter.reserved_usd + amount.usd > usd_limit:
        return Unit.USD
    return None


class Planner:
    """Builds check plans; keeps a cache of the current calendar windows (a plain memo: still pure in effect)."""

    __slots__ = ("_policy", "_scopes", "_spans", "_task_types")

    def __init__(self) -> None:
        self._policy: Policy | None = None  # the policy the caches below were filled from
        self._spans = SpanCache()
        self._task_types: dict[int, tuple[TaskTypePolicy, tuple[Scope, Scope | None, Thresholds]]] = {}
        # Per tenant policy: its window scopes and the time range they hold for (all spans current).
        self._scopes: dict[int, tuple[TenantPolicy, int, int, tuple[Scope, ...]]] = {}

    def _task_type_scopes(self, rules: TaskTypePolicy) -> tuple[Scope, Scope | None, Thresholds]:
        """A task type's task scope (without an explicit ceiling), per-step cap and thresholds, made once per policy."""
        cached = self._task_types.get(id(rules))
        if cached is not None and cached[0] is rules:
            return cached[1]
        task = Scope(
            name=TASK_SCOPE,
            kind=ScopeKind.TASK,
            limit=rules.per_task.tokens,
            limit_usd=rules.per_task.usd_micros,
        )
        step = None
        if rules.per_step.is_set:
            step = Scope(
                name=STEP_SCOPE,
                kind=ScopeKind.STEP,
                limit=rules.per_step.tokens,
                limit_usd=rules.per_step.usd_micros,
            )
        made = (task, step, Thresholds(rules.soft_bp, rules.checkpoint_bp))
        self._task_types[id(rules)] = (rules, made)
        return made

    def window_scopes(self, tenant: TenantPolicy, now_ms: int) -> tuple[Scope, ...]:
        cached = self._scopes.get(id(tenant))
        if cached is not None and cached[0] is tenant and cached[1] <= now_ms < cached[2]:
            return cached[3]
        scopes = [
            Scope(
                name=WINDOW_SCOPE_NAMES[window],
                kind=ScopeKind.TENANT_WINDOW,
                limit=limit.tokens,
                span=self._spans.get(window, tenant.time_zone, now_ms),
                limit_usd=limit.usd_micros,
            )
            for window, limit in tenant.window_limits()
        ]
        scopes.reverse()
        spans = [scope.span for scope in scopes if scope.span is not None]
        valid_from = max((span.start_ms for span in spans), default=now_ms)
        valid_until = min((span.end_ms for span in spans), default=now_ms + 1)
        if len(self._scopes) > 4096:  # more tenants than a policy holds: window_scopes was given others
            self._scopes.clear()
        self._scopes[id(tenant)] = (tenant, valid_from, valid_until, tuple(scopes))
        return tuple(scopes)

    def forget_other_policies(self, policy: Policy) -> None:
        """Empty the caches when ``policy`` is not the one they were filled from: a reloaded policy's tenants and task
        types are new objects, and entries of the old ones would keep every earlier policy alive."""
        if policy is not self._policy:
            self._policy = policy
            self._scopes.clear()
            self._task_types.clear()

    def plan_check(self, policy: Policy, request: CheckInput, now_ms: int) -> CheckPlan:
        self.forget_other_policies(policy)
        shape = Shape(
            model=request.model,
            input_tokens=request.input_tokens,
            output_tokens=request.output_tokens,
            tool_calls=request.tool_calls,
        )
        model, assumed = policy.model(request.model)
        requested = Amount(shape.tokens, estimate_micros(model, shape.input_tokens, shape.output_tokens))
        tenant = policy.tenant(request.tenant_id)
        if tenant is None:
            message = f"tenant {request.tenant_id!r} is not in the policy and the policy rejects unknown tenants"
            return _refused(request, requested, shape, assumed, Reason.UNKNOWN_TENANT, message)
        resolved = policy.task_type(request.task_type)
        if resolved is None:
            message = f"task type {request.task_type!r} is not in the policy and the policy has no default task type"
            return _refused(request, requested, shape, assumed, Reason.UNKNOWN_TASK_TYPE, message)
        task_type, rules = resolved
        task, step, thresholds = self._task_type_scopes(rules)
        if request.task_ceiling is not None:
            task = replace(task, limit=_task_limit(rules.per_task.tokens, request.task_ceiling))
        counted = (task, *self.window_scopes(tenant, now_ms))
        candidates = _candidates(policy, rules, shape, requested, step)
        return CheckPlan(
            requested=requested,
            task_type=task_type,
            thresholds=thresholds,
            lease_seconds=rules.lease_seconds,
            counted=counted,
            step=step,
            candidates=candidates,
            shape=shape,
            model_assumed=assumed,
        )


def _refused(
    request: CheckInput, requested: Amount, shape: Shape, assumed: bool, reason: Reason, message: str
) -> CheckPlan:
    """A plan answered without the store (DENY): the policy does not know the tenant or the task type."""
    return CheckPlan(
        requested=requested,
        task_type=request.task_type,
        thresholds=NO_THRESHOLDS,
        lease_seconds=None,
        counted=(),
        step=None,
        candidates=(),
        shape=shape,
        model_assumed=assumed,
        early=Verdict(decision=Decision.DENY, reason=reason, granted=0, message=message),
    )


def _task_limit(policy_limit: int | None, explicit: int | None) -> int | None:
    """An explicit ceiling is honoured, but never above what the policy allows."""
    if explicit is None:
        return policy_limit
    return explicit if policy_limit is None else min(explicit, policy_limit)


def apply_rung(policy: Policy, rung: Rung, shape: Shape) -> Shape:
    model = shape.model
    if rung.model == "cheaper":
        known = policy.models.get(shape.model)
        model = known.degrade_to if known is not None and known.degrade_to else shape.model
    elif rung.model is not None:
        model = rung.model
    return Shape(
        model=model,
        input_tokens=shape.input_tokens
        if rung.max_context_tokens is None
        else min(shape.input_tokens, rung.max_context_tokens),
        output_tokens=shape.output_tokens
        if rung.max_output_tokens is None
        else min(shape.output_tokens, rung.max_output_tokens),
        tool_calls=shape.tool_calls if rung.max_tool_calls is None else min(shape.tool_calls, rung.max_tool_calls),
    )


def _within_cap(step: Scope, amount: Amount) -> bool:
    """The fit rule against a cap on one request (an empty counter): ``fits(Counter(step limits), amount)``."""
    if step.limit is not None and amount.tokens > step.limit:
        return False
    return step.limit_usd is None or amount.usd <= step.limit_usd


def _candidates(
    policy: Policy, rules: TaskTypePolicy, asked: Shape, requested: Amount, step: Scope | None
) -> tuple[Candidate, ...]:
    out: list[Candidate] = []

    def add(shape: Shape, amount: Amount, bound: Bound, rung: str | None) -> None:
        if step is not None and not _within_cap(step, amount):
            return  # above the per-step cap
        if out and out[-1].amount == amount and out[-1].bound == bound and out[-1].shape == shape:
            return
        out.append(Candidate(amount, bound, shape, rung))

    add(asked, requested, Bound.SOFT, None)
    shape = asked
    for rung in rules.degrade:
        degraded = apply_rung(policy, rung, shape)
        if degraded == shape:
            continue  # this rung changes nothing for this request
        shape = degraded
        model, _ = policy.model(shape.model)
        add(
            shape,
            Amount(shape.tokens, estimate_micros(model, shape.input_tokens, shape.output_tokens)),
            Bound.CHECKPOINT,
            rung.name,
        )
    if rules.soft_bp is not None:
        add(asked, requested, Bound.CHECKPOINT, None)
    return tuple(out)


def simulate(plan: CheckPlan, counters: tuple[Counter, ...], thresholds: Thresholds) -> StoreOutcome:
    """What lua/check.lua does for a plan, without a store: which candidate it would reserve, or whether it would open
    a checkpoint. For ``policy explain`` and for testing the Lua against the rules. Counters are before the call."""
    task, windows = counters[0], counters[1:]
    for index, candidate in enumerate(plan.candidates):
        windows_fit = all(fits(counter, candidate.amount) for counter in windows)
        if windows_fit and fits(task, candidate.amount, *_task_bounds(task, thresholds, candidate.bound)):
            amount = candidate.amount
            granted = tuple(
                replace(
                    counter, reserved=counter.reserved + amount.tokens, reserved_usd=counter.reserved_usd + amount.usd
                )
                for counter in counters
            )
            return StoreOutcome(status=StoreStatus.RESERVED, fitted=index, counters=granted, thresholds=thresholds)
    if thresholds.checkpoint_bp is not None:
        for candidate in plan.candidates:
            windows_fit = all(fits(counter, candidate.amount) for counter in windows)
            if windows_fit and not fits(task, candidate.amount, *_task_bounds(task, thresholds, Bound.CHECKPOINT)):
                return StoreOutcome(
                    status=StoreStatus.CHECKPOINT,
                    fitted=None,
                    counters=counters,
                    thresholds=thresholds,
                    checkpoint_id="(a new checkpoint)",
                )
    return StoreOutcome(status=StoreStatus.NOTHING, fitted=None, counters=counters, thresholds=thresholds)


def advice_for(asked: Shape, candidate: Candidate) -> Advice:
    shape = candidate.shape
    return Advice(
        rung=candidate.rung or "",
        model=shape.model if shape.model != asked.model else "",
        max_context_tokens=shape.input_tokens if shape.input_tokens < asked.input_tokens else 0,
        max_output_tokens=shape.output_tokens if shape.output_tokens < asked.output_tokens else 0,
        max_tool_calls=shape.tool_calls if shape.tool_calls < asked.tool_calls else None,
    )


def _task_bounds(counter: Counter, thresholds: Thresholds, bound: Bound) -> tuple[int | None, int | None]:
    """The task's effective limits for a candidate bound, in tokens and micro-USD."""
    checkpoint = (
        threshold_of(counter.limit, thresholds.checkpoint_bp),
        threshold_of(counter.limit_usd, thresholds.checkpoint_bp),
    )
    if bound is Bound.CHECKPOINT or thresholds.soft_bp is None:
        return checkpoint
    return threshold_of(counter.limit, thresholds.soft_bp), threshold_of(counter.limit_usd, thresholds.soft_bp)


def _unit_text(unit: Unit, counter: Counter, amount: Amount, limit: int | None) -> str:
    if unit is Unit.USD:
        held = counter.used_usd + counter.reserved_usd
        return f"${usd_text(held)} of ${usd_text(limit or 0)} used or reserved, step costs ${usd_text(amount.usd)}"
    held = counter.used + counter.reserved
    return f"{held} of {limit} tokens used or reserved, step asks for {amount.tokens}"


def decide(plan: CheckPlan, outcome: StoreOutcome, now_ms: int) -> Verdict:
    """The decision for a plan, given what the store did."""
    if plan.early is not None:
        return plan.early
    if outcome.status is StoreStatus.CLOSED:
        return Verdict(
            decision=Decision.DENY,
            reason=Reason.TASK_CLOSED,
            granted=0,
            message="the task was closed: its checkpoint was denied",
            binding_scope=TASK_SCOPE,
        )
    if outcome.status is StoreStatus.CHECKPOINT:
        return Verdict(
            decision=Decision.CHECKPOINT,
            reason=Reason.CHECKPOINT_REQUIRED,
            granted=0,
            message=f"the task reached its checkpoint threshold; nothing more is granted until checkpoint "
            f"{outcome.checkpoint_id} is approved",
            binding_scope=TASK_SCOPE,
            checkpoint_id=outcome.checkpoint_id,
        )
    if outcome.fitted is not None:
        return _granted(plan, outcome, plan.candidates[outcome.fitted])
    return _denied(plan, outcome, now_ms)


# The fields of a request that ``Planner.plan_check`` reads: under one policy and one clock reading, checks that agree
# on them get the same plan, so a caller may share one (plans are not mutated). Kept beside plan_check: a field it comes
# to read belongs here too. An attrgetter: called once per check, in C.
plan_inputs: Callable[[CheckInput], tuple[object, ...]] = attrgetter(
    "tenant_id", "task_type", "model", "input_tokens", "output_tokens", "tool_calls", "task_ceiling"
)


def granted_as_asked(plan: CheckPlan, fitted: int) -> Verdict | None:
    """``decide``'s verdict when the store reserved candidate ``fitted`` of ``plan`` (StoreStatus.RESERVED), if it
    depends on nothing else: a candidate that is the request as asked is an ALLOW of its amount, whatever the counters.
    None for a degraded one (its verdict explains itself from the counters). Pure, so a caller may share the verdict
    between checks of one plan."""
    if plan.early is not None:
        return None
    candidate = plan.candidates[fitted]
    return _allowed(candidate) if candidate.rung is None else None


def _allowed(candidate: Candidate) -> Verdict:
    amount = candidate.amount
    message = f"allowed {amount.tokens} tokens"
    if candidate.bound is Bound.CHECKPOINT:
        message += " (the task is past its soft threshold, and no degrade rung makes this step cheaper)"
    return Verdict(
        decision=Decision.ALLOW,
        reason=Reason.WITHIN_BUDGET,
        granted=amount.tokens,
        message=message,
        granted_usd=amount.usd,
    )


def _granted(plan: CheckPlan, outcome: StoreOutcome, candidate: Candidate) -> Verdict:
    amount = candidate.amount
    if candidate.rung is None:
        return _allowed(candidate)
    # Why the request was not granted as asked is a question about the counters as they were before this grant.
    before = _before_grant(outcome.counters, amount)
    binding, unit, line = _first_misfit_as_asked(plan, before, outcome.thresholds)
    step = plan.step
    if step is not None:
        step_unit = _failing_unit(
            Counter(limit=step.limit, used=0, reserved=0, limit_usd=step.limit_usd), plan.requested
        )
        if step_unit is not None:
            binding, unit, line = STEP_SCOPE, step_unit, "limit"
    if binding:
        limit_kind = "cost" if unit is Unit.USD else "token"
        reason, why = Reason.DEGRADED_TO_FIT, f"the request does not fit the {binding} {limit_kind} {line} as asked"
    else:
        reason, why = Reason.SOFT_THRESHOLD, "the task is past its soft threshold"
        binding, unit = TASK_SCOPE, _soft_unit(plan, before[0], outcome.thresholds)
    message = f"degraded by rung {candidate.rung!r}: {why}; granted {amount.tokens} of {plan.requested.tokens} tokens"
    advice = advice_for(plan.shape, candidate)
    return Verdict(
        decision=Decision.DEGRADE,
        reason=reason,
        granted=amount.tokens,
        message=message,
        binding_scope=binding,
        retry_after_ms=None,
        binding_unit=unit,
        granted_usd=amount.usd,
        advice=advice,
    )


def _before_grant(counters: tuple[Counter, ...], granted: Amount) -> tuple[Counter, ...]:
    """The counters as they were before the store reserved ``granted`` (it adds the grant to every counted scope)."""
    return tuple(
        replace(counter, reserved=counter.reserved - granted.tokens, reserved_usd=counter.reserved_usd - granted.usd)
        for counter in counters
    )


def _soft_unit(plan: CheckPlan, task: Counter, thresholds: Thresholds) -> Unit:
    return _failing_unit(task, plan.requested, *_task_bounds(task, thresholds, Bound.SOFT)) or Unit.TOKENS


def _first_misfit_as_asked(
    plan: CheckPlan, counters: tuple[Counter, ...], thresholds: Thresholds
) -> tuple[str, Unit | None, str]:
    """The first scope (binding order) that the request as asked does not fit, in which unit, and which line of it.

    A scope's own limit counts here, not the task's soft threshold (past that, the reason is SOFT_THRESHOLD). A task
    without a soft threshold holds the request as asked to its checkpoint line, so there that line counts."""
    for scope, counter in zip(plan.counted, counters, strict=True):
        limits, line = (counter.limit, counter.limit_usd), "limit"
        if scope.kind is ScopeKind.TASK and thresholds.soft_bp is None and thresholds.checkpoint_bp is not None:
            limits, line = _task_bounds(counter, thresholds, Bound.CHECKPOINT), "checkpoint line"
        unit = _failing_unit(counter, plan.requested, *limits)
        if unit is not None:
            return scope.name, unit, line
    return "", None, ""


def _denied(plan: CheckPlan, outcome: StoreOutcome, now_ms: int) -> Verdict:
    if not plan.candidates:
        step = plan.step
        assert step is not None
        unit = (
            _failing_unit(Counter(limit=step.limit, used=0, reserved=0, limit_usd=step.limit_usd), plan.requested)
            or Unit.TOKENS
        )
        cap = f"{step.limit} tokens" if unit is Unit.TOKENS else f"${usd_text(step.limit_usd or 0)}"
        asked = f"{plan.requested.tokens} tokens" if unit is Unit.TOKENS else f"${usd_text(plan.requested.usd)}"
        message = f"step asks for {asked}, above the per-step cap of {cap}, and no degrade rung brings it under"
        return Verdict(
            decision=Decision.DENY,
            reason=Reason.STEP_CAP_EXCEEDED,
            granted=0,
            message=message,
            binding_scope=STEP_SCOPE,
            binding_unit=unit,
        )
    # Explain with the cheapest thing that was tried: if even that does not fit, nothing does.
    cheapest = plan.candidates[-1].amount
    for scope, counter in zip(plan.counted, outcome.counters, strict=True):
        if scope.kind is ScopeKind.TASK:
            limits = _task_bounds(counter, outcome.thresholds, Bound.CHECKPOINT)
        else:
            limits = (counter.limit, counter.limit_usd)
        failing = _failing_unit(counter, cheapest, *limits)
        if failing is None:
            continue
        unit = failing
        limit = limits[0] if unit is Unit.TOKENS else limits[1]
        detail = _unit_text(unit, counter, cheapest, limit)
        if scope.kind is ScopeKind.TASK:
            return Verdict(
                decision=Decision.DENY,
                reason=Reason.TASK_BUDGET_EXHAUSTED,
                granted=0,
                message=f"task budget exhausted: {detail}",
                binding_scope=scope.name,
                binding_unit=unit,
            )
        assert scope.span is not None
        needed = cheapest.tokens if unit is Unit.TOKENS else cheapest.usd
        # Waiting helps only if the step could fit an empty window at all.
        retry_after = scope.span.end_ms - now_ms if limit is not None and needed <= limit else None
        message = f"{scope.name} window {scope.span.label} exhausted: {detail}"
        return Verdict(
            decision=Decision.DENY,
            reason=Reason.TENANT_WINDOW_EXHAUSTED,
            granted=0,
            message=message,
            binding_scope=scope.name,
            retry_after_ms=retry_after,
            binding_unit=unit,
        )
    # Counters moved between the script's decision and this explanation cannot happen (they come from the same call).
    return Verdict(
        decision=Decision.DENY,
        reason=Reason.TASK_BUDGET_EXHAUSTED,
        granted=0,
        message="no candidate fits",
        binding_scope=TASK_SCOPE,
    )
