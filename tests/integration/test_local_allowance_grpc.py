"""A sidecar started with --local-allowance, over a real socket: checks of a task after its first are decided from a
slice, a report of one finds its reservation, and shutdown hands the unused slice back (docs/local-allowance.md)."""

from __future__ import annotations

from collections.abc import Callable

import redis

from budgetwarden.store import TenantKeys
from budgetwarden_client import BudgetClient, pb

from support import TEST_RPC_TIMEOUT_S, RunningSidecar


def task_counters(sync_redis: redis.Redis, task: str) -> dict[str, int]:
    raw = sync_redis.hgetall(TenantKeys("acme").task(task))
    return {k.decode(): int(v) for k, v in raw.items() if v.lstrip(b"-").isdigit()}


def test_a_sidecar_with_a_local_allowance_decides_reports_and_hands_back(
    start_sidecar: Callable[..., RunningSidecar], sync_redis: redis.Redis
) -> None:
    running = start_sidecar(local_allowance=True, local_allowance_cap_tokens=5000, local_allowance_share=0.5)
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        answers = [
            client.check(tenant_id="acme", task_id="t", step_id=f"s{n}", estimated_input_tokens=100) for n in range(4)
        ]
        assert [a.decision for a in answers] == [pb.DECISION_ALLOW] * 4
        assert not any(a.from_fail_mode for a in answers)
        assert running.sidecar is not None
        assert running.sidecar.allowances is not None
        assert running.sidecar.allowances.local_checks == 3  # all but the task's first check
        # The default policy's task: its first step, and the slice (5000) that holds the other three.
        assert task_counters(sync_redis, "t")["reserved"] == 100 + 5000
        record = pb.UsageRecord(tenant_id="acme", task_id="t", step_id="s2", input_tokens=60)
        result = client.report([record]).results[0]
        assert (result.status, result.refunded_tokens) == (pb.REPORT_STATUS_APPLIED, 40)
    running.stop()
    counters = task_counters(sync_redis, "t")
    assert (counters["used"], counters["reserved"]) == (60, 300)  # s0, s1 and s3 still hold their grants
