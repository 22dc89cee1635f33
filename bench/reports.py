"""Report throughput: the unary batch path and the client-streaming path, against the store itself in the same run.

Starts a Valkey (append-only file, fsync every second, as the embedded default runs it) and a `budgetwarden serve`
subprocess on it, then applies usage records four ways:
  store            - Limiter.report in-process (report.lua calls of up to 100 records, one pipeline per batch), on
                     records with no reservation behind them: the floor under the sidecar;
  store, reserved  - the same, on steps that were checked first (untimed): each record replaces its reservation;
  unary            - Report RPCs of 500 records from several client threads;
  stream           - ReportStream RPCs, each carrying several 500-record messages.
Each row also gives the CPU time per record of the process applying the records (the bench itself in-process, the
sidecar over gRPC) and of Valkey.

    .venv/bin/python bench/reports.py [--records 100000] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
from redis.asyncio import Redis

from budgetwarden.domain._model import CheckInput, Outcome, ReportStatus, UsageInput
from budgetwarden.domain._policy import parse_policy
from budgetwarden.limiter import Limiter
from budgetwarden.store._embedded import EmbeddedRedis, free_port
from budgetwarden.store._store import BudgetStore
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_api.v1 import budget_pb2_grpc as pb_grpc
from budgetwarden_client import BudgetClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds, machine, publish, wait_serving

POLICY = "default_tenant: {windows: {day: {tokens: 1000000000000}}}\ndefault_task_type: t\ntask_types: {t: {}}\n"
BATCH = 500


def records(prefix: str, count: int) -> list[pb.UsageRecord]:
    return [
        pb.UsageRecord(
            tenant_id="bench",
            task_id=f"{prefix}-task-{i % 100}",
            step_id=f"{i}",
            model="m",
            input_tokens=100,
            output_tokens=20,
            idempotency_key=f"{prefix}-{uuid.uuid4().hex}",
        )
        for i in range(count)
    ]


def run_threads(target, count: int, threads: int) -> float:  # type: ignore[no-untyped-def]
    per = count // threads
    started = time.perf_counter()
    pool = [threading.Thread(target=target, args=(t, per)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return per * threads / (time.perf_counter() - started)


class Row:
    def __init__(self, path: str, rate: float, applier_us: float, valkey_us: float) -> None:
        self.path, self.rate, self.applier_us, self.valkey_us = path, rate, applier_us, valkey_us


def measured(path: str, count: int, applier_pid: int, valkey_pid: int, run: Callable[[], float]) -> Row:
    """Runs one path; ``run`` applies ``count`` records and returns its records/s."""
    applier, valkey = cpu_seconds(applier_pid), cpu_seconds(valkey_pid)
    rate = run()
    return Row(
        path,
        rate,
        (cpu_seconds(applier_pid) - applier) / count * 1e6,
        (cpu_seconds(valkey_pid) - valkey) / count * 1e6,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    count = args.records // (BATCH * args.threads) * BATCH * args.threads
    if count == 0:
        parser.error(f"--records must be at least {BATCH * args.threads}")

    with tempfile.TemporaryDirectory() as tmp:
        valkey = EmbeddedRedis(Path(tmp) / "valkey", port=free_port(), persistent=True)
        url = valkey.start()
        valkey_pid = valkey.pid
        assert valkey_pid is not None
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        addr = f"127.0.0.1:{free_port()}"
        server = subprocess.Popen(
            [sys.executable, "-m", "budgetwarden", "serve", "--listen", addr, "--redis-url", url,
             "--policy-file", str(policy), "--log-level", "WARNING", "--usage-stream-max-len", "10000000"],
        )  # fmt: skip
        try:
            wait_serving(addr)

            def direct(prefix: str, reserve: bool) -> float:
                expected = ReportStatus.APPLIED if reserve else ReportStatus.UNRESERVED

                async def apply() -> float:
                    client = Redis.from_url(url)
                    loaded = parse_policy(POLICY, "bench")
                    limiter = Limiter(BudgetStore(client), lambda: loaded, check_deadline_s=60.0, store_deadline_s=60.0)
                    batches = []
                    for b in range(count // BATCH):
                        batch = [
                            UsageInput(
                                tenant_id="bench",
                                reservation_id="",
                                task_id=f"{prefix}-task-{i % 100}",
                                step_id=f"{b}-{i}",
                                task_type="",
                                model="m",
                                input_tokens=100,
                                output_tokens=20,
                                cached_input_tokens=0,
                                tool_calls=0,
                                outcome=Outcome.COMPLETED,
                                idempotency_key=f"{prefix}-{b}-{i}",
                                timestamp_ms=None,
                            )
                            for i in range(BATCH)
                        ]
                        batches.append(batch)
                        if reserve:
                            await limiter.check_many(
                                [
                                    CheckInput(
                                        tenant_id="bench",
                                        task_id=r.task_id,
                                        step_id=r.step_id,
                                        task_type="",
                                        model="m",
                                        input_tokens=150,
                                        output_tokens=0,
                                        tool_calls=0,
                                    )
                                    for r in batch
                                ]
                            )
                    started = time.perf_counter()
                    for batch in batches:
                        applied = await limiter.report(batch)
                        assert all(item.status is expected for item in applied)
                    elapsed = time.perf_counter() - started
                    await client.aclose()
                    return len(batches) * BATCH / elapsed

                return asyncio.run(apply())

            def unary(thread: int, per_thread: int) -> None:
                work = records(f"u{thread}", per_thread)
                with BudgetClient(addr, timeout=60) as client:
                    for i in range(0, per_thread, BATCH):
                        client.report(work[i : i + BATCH])

            def stream(thread: int, per_thread: int) -> None:
                work = records(f"s{thread}", per_thread)
                messages = [pb.ReportStreamRequest(records=work[i : i + BATCH]) for i in range(0, per_thread, BATCH)]
                with grpc.insecure_channel(addr) as channel:
                    stub = pb_grpc.BudgetServiceStub(channel)
                    for i in range(0, len(messages), 20):
                        answer = stub.ReportStream(iter(messages[i : i + 20]), timeout=120)
                        assert answer.records == sum(len(m.records) for m in messages[i : i + 20])

            me, sidecar = os.getpid(), server.pid
            rows = [
                measured("store in-process", count, me, valkey_pid, lambda: direct("d", reserve=False)),
                # The checks before it are part of this row's CPU; only its rate is of the reports alone.
                measured("store in-process, after checks", count, me, valkey_pid, lambda: direct("r", reserve=True)),
                measured(
                    f"unary Report, {BATCH} records per call",
                    count,
                    sidecar,
                    valkey_pid,
                    lambda: run_threads(unary, count, args.threads),
                ),
                measured(
                    f"ReportStream, 20 messages of {BATCH} per stream",
                    count,
                    sidecar,
                    valkey_pid,
                    lambda: run_threads(stream, count, args.threads),
                ),
            ]
        finally:
            server.terminate()
            server.wait(30)
            valkey.stop()

    floor = rows[0].rate
    lines = [
        f"### Report throughput ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python bench/reports.py --records {args.records}` "
        f"({count:,} records per path, batches of {BATCH}, {args.threads} client threads; Valkey with AOF "
        "everysec, the sidecar and the clients on the same machine).",
        "",
        "| path | records/s | vs. the store in-process | applier CPU µs/record | Valkey CPU µs/record |",
        "|---|---|---|---|---|",
        *(
            f"| {row.path} | {row.rate:,.0f} | {row.rate / floor:.2f} | {row.applier_us:,.0f} | {row.valkey_us:,.0f} |"
            for row in rows
        ),
        "",
        "The applier is the bench process for the in-process rows and the sidecar for the gRPC rows; the row after "
        "checks counts the CPU of its (untimed) checks too.",
        "",
    ]
    publish(lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
