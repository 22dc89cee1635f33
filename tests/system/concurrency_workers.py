"""The worker processes of tests/system/test_concurrency.py. A module of their own, importing only the client: each
spawned process imports the module of its target, and the test module's imports (the server, the test helpers) would
cost every worker a second of start-up on a busy machine."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Sequence
from typing import Any

from budgetwarden_client import BudgetClient, pb

TENANT = "acme"  # as in support_concurrency
BARRIER_TIMEOUT_S = 60.0
Row = dict[str, Any]


def _grpc_call(client: BudgetClient, kind: str, job: tuple[Any, ...]) -> Row:
    if kind == "check":
        task_id, step_id, tokens = job
        answer = client.check(
            tenant_id=TENANT, task_id=task_id, step_id=step_id, estimated_input_tokens=tokens, max_output_tokens=0
        )
        return {
            "task": task_id,
            "step": step_id,
            "tokens": tokens,
            "decision": answer.decision,
            "reason": answer.reason,
            "binding": answer.binding_scope,
            "granted": answer.granted_tokens,
            "rid": answer.reservation_id,
            "replayed": answer.replayed,
            "fail_mode": answer.from_fail_mode,
        }
    task_id, step_id, tokens, key = job
    record = pb.UsageRecord(
        tenant_id=TENANT, task_id=task_id, step_id=step_id, input_tokens=tokens, idempotency_key=key
    )
    (result,) = client.report([record]).results
    return {
        "task": task_id,
        "step": step_id,
        "tokens": tokens,
        "status": result.status,
        "rid": result.reservation_id,
        "charged": result.charged_tokens,
        "refunded": result.refunded_tokens,
        "overage": result.overage_tokens,
    }


def grpc_worker(
    index: int, results: Any, barrier: Any, addr: str, kind: str, per_thread: Sequence[Sequence[tuple[Any, ...]]]
) -> None:
    try:
        rows: list[Row] = []
        errors: list[str] = []
        lock = threading.Lock()

        def run(jobs: Sequence[tuple[Any, ...]]) -> None:
            try:
                with BudgetClient(addr, timeout=60.0) as client:
                    client.get_budget(tenant_id=TENANT)  # connect before the start line
                    barrier.wait(BARRIER_TIMEOUT_S)
                    mine = [_grpc_call(client, kind, job) for job in jobs]
                with lock:
                    rows.extend(mine)
            except BaseException:
                barrier.abort()
                with lock:
                    errors.append(traceback.format_exc())

        threads = [threading.Thread(target=run, args=(jobs,)) for jobs in per_thread]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise RuntimeError("\n".join(errors))
        results.put((index, None, rows))
    except BaseException:
        results.put((index, traceback.format_exc(), None))
