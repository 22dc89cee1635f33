"""A replayed check answers what the first check of its step answered.

A reservation keeps, written by lua/check.lua in the same HSET that reserves, the fingerprint of the request and what
the answer was made from: the request's cost and the step cap (the part common to every candidate), the candidate
that was reserved (its bound, rung and shape), and, for a degraded grant, the figures the answer was explained from.
A replay rebuilds the answer with the same ``decide`` from those, never from the current policy (which may have
changed since). A re-check whose fingerprint differs is refused by the script (StoreStatus.CONFLICT).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from budgetwarden.domain import (
    STEP_SCOPE,
    WINDOW_SCOPE_NAMES,
    Amount,
    Bound,
    Candidate,
    CheckInput,
    CheckPlan,
    Counter,
    Decision,
    Reason,
    Scope,
    ScopeKind,
    Shape,
    StoreOutcome,
    StoreStatus,
    Verdict,
    Window,
    decide,
    task_scope,
)

from ._codec import ANSWER_SEPARATOR, field_text, limit_arg, optional, read_counters, read_thresholds
from ._store import Reservation

REPLAY_NOTE = "step was checked before: "


def fingerprint(request: CheckInput, shape: Shape) -> str:
    """What decides a check's answer besides the policy and the counters: the model, the input (as counted), output and
    tool calls, the task type and an explicit task ceiling. The lease is not part of it (a replay keeps its lease)."""
    text = (
        f"{shape.model}\x1f{request.task_type}\x1f{shape.input_tokens}\x1f{shape.output_tokens}\x1f"
        f"{shape.tool_calls}\x1f{limit_arg(request.task_ceiling)}"
    )
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def common_part(plan: CheckPlan) -> str:
    """The stored answer's part common to every candidate: the request's cost, the step cap, the windows' kinds."""
    step = plan.step
    windows = "".join([str(scope.span.window.value) for scope in plan.counted[1:] if scope.span is not None])
    if step is None:
        return f"{plan.requested.usd}\x1e-1\x1e-1\x1e{windows}"
    return f"{plan.requested.usd}\x1e{limit_arg(step.limit)}\x1e{limit_arg(step.limit_usd)}\x1e{windows}"


def candidate_part(candidate: Candidate) -> str:
    """The stored answer's part of one candidate: its bound, rung and shape (its amount is what the record holds)."""
    shape = candidate.shape
    rung = "" if candidate.rung is None else field_text(candidate.rung)
    return (
        f"{candidate.bound.value}\x1e{rung}\x1e{field_text(shape.model)}\x1e{shape.input_tokens}\x1e"
        f"{shape.output_tokens}\x1e{shape.tool_calls}"
    )


def replayed_answer(plan: CheckPlan, reservation: Reservation, now_ms: int) -> tuple[Verdict, Amount]:
    """The verdict and the requested amount of the step's first check, rebuilt from its reservation. ``plan`` is the
    re-check's, which has the same fingerprint: only the request's own fields (its shape and tokens) are taken from
    it. A record from before answers were stored answers a plain ALLOW of what it holds."""
    granted = reservation.granted
    parts = reservation.answer.split(ANSWER_SEPARATOR)
    if len(parts) < 10:
        message = REPLAY_NOTE + f"allowed {granted.tokens} tokens"
        verdict = Verdict(
            decision=Decision.ALLOW,
            reason=Reason.WITHIN_BUDGET,
            granted=granted.tokens,
            message=message,
            granted_usd=granted.usd,
        )
        return verdict, plan.requested
    usd, step_limit, step_limit_usd, windows, bound, rung, model, input_tokens, output_tokens, tool_calls = parts[:10]
    if len(parts) > 10:  # a degraded grant: explained from the figures of its first answer
        figures = [int(value) for value in parts[10].split()]
        thresholds, counters = read_thresholds(figures[0], figures[1]), read_counters(figures[2:])
    else:  # an answer that does not depend on the figures
        thresholds = reservation.thresholds
        counters = reservation.counters
        if len(counters) != 1 + len(windows):  # the policy's windows changed since: the figures go unused anyway
            counters = tuple(Counter(limit=None, used=0, reserved=0) for _ in range(1 + len(windows)))
    requested = Amount(plan.requested.tokens, int(usd))
    first = counters[0]
    counted = (
        task_scope(first),
        *(
            Scope(
                name=WINDOW_SCOPE_NAMES[Window(int(kind))],
                kind=ScopeKind.TENANT_WINDOW,
                limit=c.limit,
                limit_usd=c.limit_usd,
            )
            for kind, c in zip(windows, counters[1:], strict=True)
        ),
    )
    cap = (optional(step_limit), optional(step_limit_usd))
    step = None if cap == (None, None) else Scope(name=STEP_SCOPE, kind=ScopeKind.STEP, limit=cap[0], limit_usd=cap[1])
    shape = Shape(
        model=model, input_tokens=int(input_tokens), output_tokens=int(output_tokens), tool_calls=int(tool_calls)
    )
    candidate = Candidate(granted, Bound(int(bound)), shape, rung or None)
    first_plan = CheckPlan(
        requested=requested,
        task_type=plan.task_type,
        thresholds=thresholds,
        lease_seconds=None,
        counted=counted,
        step=step,
        candidates=(candidate,),
        shape=plan.shape,
    )
    verdict = decide(
        first_plan,
        StoreOutcome(status=StoreStatus.RESERVED, fitted=0, counters=counters, thresholds=thresholds),
        now_ms,
    )
    return replace(verdict, message=REPLAY_NOTE + verdict.message), requested
