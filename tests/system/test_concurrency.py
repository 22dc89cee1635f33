"""Many concurrent checks and reports against one task, from several OS processes, through one sidecar.

Every worker process runs its own gRPC clients on their own threads; afterwards the counters are read back and compared
with what the workers were told: the total granted never exceeds the ceiling, it ends within one step of it, the
reserved counters equal the sum granted, no step holds two reservations, and a report sent twice at once (by two
processes) is applied once. The same rules under many connections from one process, on the scripts themselves, are
tests/store/test_concurrent_scripts.py's (Redis runs each script whole, whichever process sent it).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import redis

from budgetwarden.domain._model import Decision, Reason, ReportStatus
from budgetwarden_client import BudgetClient, pb

from concurrency_workers import grpc_worker
from support import TEST_RPC_TIMEOUT_S, run_processes
from support_concurrency import (
    MAX_STEP,
    TENANT,
    Row,
    assert_ceiling_reached,
    assert_one_reservation_per_granted_step,
    policy_text,
    random_jobs,
)

PROCESSES = 4

pytestmark = pytest.mark.slow


def grpc_budget(addr: str, task_id: str) -> tuple[dict[str, pb.ScopeState], pb.GetBudgetResponse]:
    with BudgetClient(addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        answer = client.get_budget(tenant_id=TENANT, task_id=task_id)
    return {scope.name: scope for scope in answer.scopes}, answer


# ---------------------------------------------------------------------------------------------------------------
# Tests.


def test_checks_and_duplicate_reports_over_grpc_from_many_processes(
    start_sidecar: Any, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    ceiling, day = 10_000, 30_000
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(policy_text(task=ceiling, step=MAX_STEP, day=day))
    sidecar = start_sidecar(policy_file=policy_file, check_deadline_ms=30_000)
    threads = 4

    # Phase 1: checks of distinct steps of one task, from 4 processes x 4 threads.
    per_process = [
        (
            sidecar.addr,
            "check",
            [random_jobs(["task-1"], 12, seed=10 * p + t, prefix=f"p{p}t{t}") for t in range(threads)],
        )
        for p in range(PROCESSES)
    ]
    rows = [row for out in run_processes(grpc_worker, per_process, PROCESSES * threads) for row in out]
    assert len(rows) == PROCESSES * threads * 12
    total = assert_ceiling_reached(rows, ceiling, Reason.TASK_BUDGET_EXHAUSTED, "task")
    granted = [row for row in rows if row["decision"] == Decision.ALLOW]
    assert_one_reservation_per_granted_step(rows, sync_redis)

    scopes, answer = grpc_budget(sidecar.addr, "task-1")
    assert answer.task_known
    assert answer.active_reservations == len(granted)
    for name, limit in (("task", ceiling), ("tenant.day", day)):
        assert (scopes[name].limit_tokens, scopes[name].used_tokens, scopes[name].reserved_tokens) == (limit, 0, total)

    # Phase 2: every granted step is reported twice with one idempotency key, by two different processes at once.
    rng = random.Random(99)
    reports = [("task-1", row["step"], rng.randint(1, row["granted"] + 50), f"usage:{row['step']}") for row in granted]
    per_process = []
    for p in range(PROCESSES):
        # Process p reports the granted steps whose index modulo PROCESSES is p or p-1: each step by two processes.
        mine = [job for i, job in enumerate(reports) if i % PROCESSES in (p, (p - 1) % PROCESSES)]
        per_process.append((sidecar.addr, "report", [mine[t::threads] for t in range(threads)]))
    results = [row for out in run_processes(grpc_worker, per_process, PROCESSES * threads) for row in out]
    assert len(results) == 2 * len(reports)

    tokens_of = {step: tokens for _, step, tokens, _ in reports}
    granted_of = {row["step"]: row["granted"] for row in granted}
    by_step: dict[str, list[Row]] = {}
    for row in results:
        by_step.setdefault(row["step"], []).append(row)
    assert set(by_step) == set(tokens_of)
    for step, pair in by_step.items():
        statuses = sorted(row["status"] for row in pair)
        assert statuses == [ReportStatus.APPLIED, ReportStatus.DUPLICATE], step
        (applied,) = [row for row in pair if row["status"] == ReportStatus.APPLIED]
        used, held = tokens_of[step], granted_of[step]
        assert applied["charged"] == used
        assert applied["refunded"] == max(0, held - used)
        assert applied["overage"] == max(0, used - held)

    used_total = sum(tokens_of.values())
    scopes, answer = grpc_budget(sidecar.addr, "task-1")
    assert answer.active_reservations == 0
    for name in ("task", "tenant.day"):
        assert (scopes[name].used_tokens, scopes[name].reserved_tokens) == (used_total, 0), name
