"""The background usage reporter in a short-lived agent process of its own: what it queued is drained on the way out,
at exit and on SIGTERM (the server's task counters, read with GetBudget, must hold every record)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from budgetwarden_client import BudgetClient

from support import TEST_RPC_TIMEOUT_S, RunningSidecar

TENANT = "acme"


def used(addr: str, tasks: list[str]) -> dict[str, int]:
    """Each task's used tokens as the server has them."""
    with BudgetClient(addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        out = {}
        for task in tasks:
            scopes = {scope.name: scope for scope in client.get_budget(tenant_id=TENANT, task_id=task).scopes}
            out[task] = scopes["task"].used_tokens
        return out


def run_agent(addr: str, body: str, count: int) -> subprocess.CompletedProcess[str]:
    """A short-lived agent process that reports ``count`` records (task "agent", 10 tokens + 3 each) and then runs
    ``body``; flush_interval is far longer than the process lives, so only a drain on the way out sends them."""
    code = textwrap.dedent(
        f"""
        import os, signal, sys, time
        from budgetwarden_client import BackgroundReporter, pb
        reporter = BackgroundReporter({addr!r}, flush_interval=600)
        for i in range({count}):
            assert reporter.report(pb.UsageRecord(
                tenant_id={TENANT!r}, task_id="agent", step_id=f"s{{i}}", input_tokens=10, output_tokens=3))
        """
    ) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)


def test_atexit_drains_a_short_lived_process(sidecar: RunningSidecar) -> None:
    result = run_agent(sidecar.addr, "print('exiting without close()')\n", 250)
    assert result.returncode == 0, result.stderr
    assert "exiting without close()" in result.stdout
    assert used(sidecar.addr, ["agent"]) == {"agent": 250 * 13}


def test_sigterm_drains_then_terminates(sidecar: RunningSidecar) -> None:
    body = """
    reporter.install_signal_handlers()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
    print("still running")
    """
    result = run_agent(sidecar.addr, body, 150)
    assert result.returncode == -signal.SIGTERM, result.stderr
    assert "still running" not in result.stdout
    assert used(sidecar.addr, ["agent"]) == {"agent": 150 * 13}
