"""Report throughput: the unary batch path and the client-streaming path, against the store itself in the same run.

Starts a Valkey (append-only file, fsync every second, as the embedded default runs it) and a `budgetwarden serve`
subprocess on it, then applies usage records three ways:
  store  - BudgetStore.report in-process (one pipeline per batch): the floor under the sidecar;
  unary  - Report RPCs of 500 records from several client threads;
  stream - ReportStream RPCs, each carrying several 500-record messages.

    .venv/bin/python bench/reports.py [--records 100000] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import grpc
from redis.asyncio import Redis

from budgetwarden._embedded import EmbeddedRedis, free_port
from budgetwarden._limiter import Limiter
from budgetwarden._model import Outcome, UsageInput
from budgetwarden._policy import parse_policy
from budgetwarden._store import BudgetStore
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_api.v1 import budget_pb2_grpc as pb_grpc
from budgetwarden_client import BudgetClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, publish, wait_serving

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        valkey = EmbeddedRedis(Path(tmp) / "valkey", port=free_port(), persistent=True)
        url = valkey.start()
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        addr = f"127.0.0.1:{free_port()}"
        server = subprocess.Popen(
            [sys.executable, "-m", "budgetwarden", "serve", "--listen", addr, "--redis-url", url,
             "--policy-file", str(policy), "--log-level", "WARNING", "--usage-stream-max-len", "10000000"],
        )  # fmt: skip
        try:
            wait_serving(addr)

            async def direct() -> float:
                client = Redis.from_url(url)
                loaded = parse_policy(POLICY, "bench")
                limiter = Limiter(BudgetStore(client), lambda: loaded)
                batches = []
                for b in range(args.records // BATCH):
                    batch = [
                        UsageInput("bench", "", f"d-task-{i % 100}", f"{b}-{i}", "", "m", 100, 20, 0, 0,
                                   Outcome.COMPLETED, f"d-{b}-{i}", None)
                        for i in range(BATCH)
                    ]  # fmt: skip
                    batches.append(batch)
                started = time.perf_counter()
                for batch in batches:
                    await limiter.report(batch)
                elapsed = time.perf_counter() - started
                await client.aclose()
                return len(batches) * BATCH / elapsed

            store_rate = asyncio.run(direct())

            def unary(thread: int, count: int) -> None:
                work = records(f"u{thread}", count)
                with BudgetClient(addr, timeout=60) as client:
                    for i in range(0, count, BATCH):
                        client.report(work[i : i + BATCH])

            unary_rate = run_threads(unary, args.records, args.threads)

            def stream(thread: int, count: int) -> None:
                work = records(f"s{thread}", count)
                messages = [pb.ReportStreamRequest(records=work[i : i + BATCH]) for i in range(0, count, BATCH)]
                with grpc.insecure_channel(addr) as channel:
                    stub = pb_grpc.BudgetServiceStub(channel)
                    for i in range(0, len(messages), 20):
                        answer = stub.ReportStream(iter(messages[i : i + 20]), timeout=120)
                        assert answer.records == sum(len(m.records) for m in messages[i : i + 20])

            stream_rate = run_threads(stream, args.records, args.threads)
        finally:
            server.terminate()
            server.wait(30)
            valkey.stop()

    lines = [
        f"### Report throughput ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python bench/reports.py --records {args.records}` "
        f"({args.records:,} records per path, batches of {BATCH}, {args.threads} client threads; Valkey with AOF "
        "everysec, the sidecar and the clients on the same machine).",
        "",
        "| path | records/s | vs. the store in-process |",
        "|---|---|---|",
        f"| store in-process (floor: one pipeline of Lua calls per batch) | {store_rate:,.0f} | 1.00 |",
        f"| unary Report, 500 records per call | {unary_rate:,.0f} | {unary_rate / store_rate:.2f} |",
        f"| ReportStream, 20 messages of 500 per stream | {stream_rate:,.0f} | {stream_rate / store_rate:.2f} |",
        "",
    ]
    publish(lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
