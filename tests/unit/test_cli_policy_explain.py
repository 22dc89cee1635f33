"""``budgetwarden policy explain``, ``main(argv)`` in process: what the rules decide, printed, with no Redis."""

from __future__ import annotations

from pathlib import Path

from support import one_error_line
from support import run_cli as cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "policy.yaml")


def explain(*args: str) -> str:
    result = cli(
        "policy", "explain", "--tenant", "default", "--policy-file", EXAMPLE, "--task-type", "research",
        "--model", "gpt-4o", *args,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_explain_allow_degrade_checkpoint_and_the_step_cap() -> None:
    assert "decision: ALLOW (WITHIN_BUDGET)" in explain("--tokens", "9000")
    degraded = explain("--tokens", "9000", "--used", "795000")
    assert "decision: DEGRADE (SOFT_THRESHOLD)" in degraded
    assert "advice: rung cheaper-model, model gpt-4o-mini" in degraded
    assert "2. cheaper-model: 9000 tokens, $0.001350 on gpt-4o-mini" in degraded
    assert "decision: CHECKPOINT (CHECKPOINT_REQUIRED)" in explain("--tokens", "9000", "--used", "949000")
    shrunk = explain("--tokens", "200000")  # above the per-step cap as asked; smaller-context brings it under
    assert "decision: DEGRADE (DEGRADED_TO_FIT)" in shrunk
    assert "max context 16000" in shrunk
    capped = cli(
        "policy", "explain", "--tenant", "default", "--policy-file", EXAMPLE, "--task-type", "general",
        "--tokens", "40000",
    )  # fmt: skip
    assert "none: the step is above the per-step cap" in capped.stdout
    assert "decision: DENY (STEP_CAP_EXCEEDED)" in capped.stdout


def test_explain_with_the_default_policy_and_bad_input() -> None:
    result = cli("policy", "explain", "--tokens", "10", env={"BUDGETWARDEN_TENANT": "default"})
    assert result.returncode == 0
    assert "<built-in default policy>" in result.stdout
    assert "decision: ALLOW" in result.stdout
    negative = cli("policy", "explain", "--tenant", "default", "--tokens", "-1")
    assert negative.returncode == 2
    assert "argument --tokens: must be from 0 to 1000000000 (got -1)" in one_error_line(negative)
    missing = cli("policy", "explain", "--tenant", "default")
    assert missing.returncode == 2
    assert "--tokens" in one_error_line(missing)
