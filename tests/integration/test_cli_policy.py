"""The policy-engine commands: policy explain (no Redis), approve and deny (against a real admin listener)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from budgetwarden.store._embedded import free_port
from budgetwarden_client import BudgetClient, pb

from support import RunningSidecar, cli, one_error_line

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


def test_approve_and_deny_from_the_command_line(start_sidecar: Callable[..., RunningSidecar]) -> None:
    admin = f"127.0.0.1:{free_port()}"
    running = start_sidecar(policy_file=Path(EXAMPLE), admin_listen=admin)
    with BudgetClient(running.addr) as client:
        for step in range(5):  # triage: 20000-token tasks that checkpoint at the ceiling
            fields = {"tenant_id": "acme", "task_id": "t", "task_type": "triage", "estimated_input_tokens": 4000}
            answer = client.check(step_id=f"s{step}", **fields)
            assert answer.decision == pb.DECISION_ALLOW
        stop = client.check(step_id="s5", **fields)
    assert stop.decision == pb.DECISION_CHECKPOINT
    approved = cli("approve", stop.checkpoint_id, "--add", "8000", "--admin-addr", admin)
    assert approved.returncode == 0, approved.stderr
    assert approved.stdout.startswith(f"APPROVED: {stop.checkpoint_id}")
    assert "28000" in approved.stdout  # the new ceiling
    again = cli("approve", stop.checkpoint_id, "--add", "8000", "--admin-addr", admin, "--json")
    assert '"outcome": "CHECKPOINT_OUTCOME_ALREADY_APPROVED"' in again.stdout
    unknown = cli("deny", stop.checkpoint_id[:-1] + "9", "--admin-addr", admin)
    assert unknown.returncode == 1
    assert unknown.stdout.startswith("NOT_FOUND")
    bad = cli("approve", "nonsense", "--admin-addr", admin)
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT: checkpoint_id" in one_error_line(bad)
    unreachable = cli("deny", stop.checkpoint_id, "--admin-addr", f"127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1
    assert "cannot reach" in one_error_line(unreachable)
