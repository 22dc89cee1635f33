"""``policy explain``'s logic lives in the domain (domain/_explain.py): it answers data and text, the CLI prints it."""

from __future__ import annotations

from pathlib import Path

from budgetwarden.domain import Decision, LoadedPolicy, Reason, explain, load_policy
from budgetwarden.domain._policy import parse_policy

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"
NOW = 1_796_000_000_000


def explained(loaded: LoadedPolicy, tokens: int, **figures: int) -> tuple[Decision, Reason, list[str]]:
    step = {"tenant_id": "default", "task_type": "research", "model": "gpt-4o", "output_tokens": 0, "tool_calls": 0}
    used = {"used": 0, "used_usd": 0, "window_used": 0} | figures
    answer = explain(loaded, tokens=tokens, now_ms=NOW, **step, **used)  # type: ignore[arg-type]
    assert answer.text == "\n".join(answer.lines)
    return answer.verdict.decision, answer.verdict.reason, list(answer.lines)


def test_explain_answers_the_decision_and_the_lines_that_explain_it() -> None:
    loaded = load_policy(EXAMPLE)
    decision, reason, lines = explained(loaded, 9000)
    assert (decision, reason) == (Decision.ALLOW, Reason.WITHIN_BUDGET)
    assert lines[0] == f"policy {loaded.source} (version {loaded.version})"
    assert lines[1].startswith("task type research: ceiling 1000000 tokens / $10.000000, soft threshold 800000")
    assert "model gpt-4o: from the table" in lines
    assert "  1. as asked: 9000 tokens, $0.022500 on gpt-4o, must fit under the soft threshold <- granted" in lines
    assert lines[-1] == "decision: ALLOW (WITHIN_BUDGET): allowed 9000 tokens"


def test_explain_takes_the_figures_it_is_given_in_tokens_and_micro_usd() -> None:
    loaded = load_policy(EXAMPLE)
    decision, _, lines = explained(loaded, 9000, used=795_000)
    assert decision is Decision.DEGRADE
    granted = "  2. cheaper-model: 9000 tokens, $0.001350 on gpt-4o-mini, must fit under the checkpoint line <- granted"
    assert granted in lines
    assert lines[-1].startswith("advice: rung cheaper-model, model gpt-4o-mini")
    assert explained(loaded, 9000, used=949_000)[0] is Decision.CHECKPOINT
    _, _, lines = explained(loaded, 10, used_usd=1_500_000)
    assert lines[1].endswith("used 0 tokens / $1.500000")


def test_explain_of_a_step_the_policy_refuses_before_any_counter() -> None:
    strict = parse_policy("unknown_tenants: reject\ntenants:\n  acme: {}\n", "strict.yaml")
    decision, reason, lines = explained(strict, 10, used=5)
    assert (decision, reason) == (Decision.DENY, Reason.UNKNOWN_TENANT)
    assert lines == [
        f"policy strict.yaml (version {strict.version})",
        "decision: DENY (UNKNOWN_TENANT): tenant 'default' is not in the policy and the policy rejects unknown tenants",
    ]
