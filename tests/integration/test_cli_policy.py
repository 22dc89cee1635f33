"""The policy-engine commands approve and deny, ``main(argv)`` in process, against a real admin listener (policy
explain, which needs no Redis, is tests/unit/test_cli_policy_explain.py's)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from budgetwarden_client import BudgetClient, pb

from support import TEST_RPC_TIMEOUT_S, RunningSidecar, free_port, one_error_line
from support import run_cli as cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "policy.yaml")


def test_approve_and_deny_from_the_command_line(start_sidecar: Callable[..., RunningSidecar]) -> None:
    admin = f"127.0.0.1:{free_port()}"
    running = start_sidecar(policy_file=Path(EXAMPLE), admin_listen=admin)
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
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
