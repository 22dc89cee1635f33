"""``budgetwarden policy explain``: the decision the rules would take for a step, and why, from figures the caller
gives instead of the store's (pure: nothing is read or reserved)."""

from __future__ import annotations

from dataclasses import dataclass

from ._cost import usd_text
from ._decision import Planner, decide, simulate
from ._model import CheckInput, Counter, Thresholds, Verdict, threshold_of
from ._policy import LoadedPolicy


@dataclass(frozen=True, slots=True, kw_only=True)
class Explanation:
    verdict: Verdict
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def _usd(micros: int | None) -> str:
    return "-" if micros is None else f"${usd_text(micros)}"


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def explain(
    loaded: LoadedPolicy,
    *,
    tenant_id: str,
    task_type: str,
    model: str,
    tokens: int,
    output_tokens: int,
    tool_calls: int,
    used: int,
    used_usd: int,
    window_used: int,
    now_ms: int,
) -> Explanation:
    """The decision for a step of ``tokens`` input and ``output_tokens`` output tokens, for a task that has used
    ``used`` tokens and ``used_usd`` micro-USD, in tenant windows that have each used ``window_used`` tokens."""
    policy = loaded.policy
    request = CheckInput(
        tenant_id=tenant_id,
        task_id="explain",
        step_id="explain",
        task_type=task_type,
        model=model,
        input_tokens=tokens,
        output_tokens=output_tokens,
        tool_calls=tool_calls,
    )
    plan = Planner().plan_check(policy, request, now_ms)
    lines = [f"policy {loaded.source} (version {loaded.version})"]
    if plan.early is None:
        task = plan.counted[0]
        rules = policy.task_type(task_type)
        assert rules is not None  # the plan found it
        thresholds = Thresholds(rules[1].soft_bp, rules[1].checkpoint_bp)
        counters = (
            Counter(limit=task.limit, used=used, reserved=0, limit_usd=task.limit_usd, used_usd=used_usd),
            *(Counter(limit=s.limit, used=window_used, reserved=0, limit_usd=s.limit_usd) for s in plan.counted[1:]),
        )
        outcome = simulate(plan, counters, thresholds)
        verdict = decide(plan, outcome, now_ms)
        soft = threshold_of(task.limit, thresholds.soft_bp) if thresholds.soft_bp is not None else None
        checkpoint = (
            threshold_of(task.limit, thresholds.checkpoint_bp) if thresholds.checkpoint_bp is not None else None
        )
        lines.append(
            f"task type {plan.task_type}: ceiling {_or_dash(task.limit)} tokens / {_usd(task.limit_usd)}, "
            f"soft threshold {_or_dash(soft)}, checkpoint at {_or_dash(checkpoint)}; "
            f"used {used} tokens / {_usd(used_usd)}"
        )
        _, assumed = policy.model(model)
        lines.append(f"model {model or '(none)'}: {'assumed default prices' if assumed else 'from the table'}")
        lines.append("candidates, tried in order:")
        for i, candidate in enumerate(plan.candidates):
            chosen = " <- granted" if outcome.fitted == i else ""
            bound = "under the soft threshold" if candidate.bound == 0 else "under the checkpoint line"
            lines.append(
                f"  {i + 1}. {candidate.rung or 'as asked'}: {candidate.amount.tokens} tokens, "
                f"{_usd(candidate.amount.usd)} on {candidate.shape.model or '(model)'}, must fit {bound}{chosen}"
            )
        if not plan.candidates:
            lines.append("  none: the step is above the per-step cap and no rung brings it under")
    else:
        verdict = plan.early
    lines.append(f"decision: {verdict.decision.name} ({verdict.reason.name}): {verdict.message}")
    if verdict.advice is not None:
        a = verdict.advice
        lines.append(
            f"advice: rung {a.rung}, model {a.model or 'unchanged'}, max context {a.max_context_tokens or '-'}, "
            f"max output {a.max_output_tokens or '-'}, max tool calls {_or_dash(a.max_tool_calls)}"
        )
    return Explanation(verdict=verdict, lines=tuple(lines))
