"""What confirming every acknowledged write costs: report throughput with each --durability, in the same run.

Starts `budgetwarden serve` five ways, side by side, each on its own data dir in one temporary directory:
  embedded, --durability none       - the embedded Valkey with `appendfsync everysec` (the old default);
  embedded, aof-local (the default) - the embedded Valkey with `appendfsync always`: fsynced before each answer;
  external, none                    - a Valkey run apart (`appendfsync everysec`) with one replica;
  external, aof-local               - the same Valkey, the sidecar sending `WAITAOF 1 0` with every script call;
  external, replicas                - the same Valkey, the sidecar sending `WAIT 1` with every script call (the
                                      write is acknowledged once the replica holds it).
and drives them in turns (--rounds slices of --seconds each) with unary Report calls of 1 record and of 100 records
from --threads client threads. Each row gives records/s, the median call latency, and the ratio to the same row on
`none` with the same Valkey (the median of the per-round ratios, so a busy neighbour weighs on both sides of each ratio
alike).

    .venv/bin/python bench/durability.py [--seconds 1] [--rounds 7] [--threads 4] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import redis

from budgetwarden.store._embedded import EmbeddedRedis, free_port
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import BudgetClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, percentile, publish, wait_serving

POLICY = "default_tenant: {windows: {day: {tokens: 1000000000000000}}}\ndefault_task_type: t\ntask_types: {t: {}}\n"
SIZES = (1, 100)


@dataclass
class Row:
    setup: str
    size: int
    rate: float
    p50_ms: float


def records(size: int) -> list[pb.UsageRecord]:
    return [
        pb.UsageRecord(
            tenant_id="bench",
            task_id=f"task-{i % 100}",
            step_id=uuid.uuid4().hex,
            model="m",
            input_tokens=100,
            output_tokens=20,
            idempotency_key=uuid.uuid4().hex,
        )
        for i in range(size)
    ]


def drive(addr: str, size: int, seconds: float, threads: int) -> tuple[float, float]:
    """Unary Report calls of ``size`` records from ``threads`` threads for ``seconds``: records/s and p50 in ms."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client_thread() -> None:
        mine: list[float] = []
        with BudgetClient(addr, timeout=60) as client:
            client.report(records(size))  # connect before the clock matters
            while not mine or time.perf_counter() < stop_at:  # one timed call at least, on a slow machine too
                batch = records(size)
                started = time.perf_counter()
                answer = client.report(batch)
                mine.append(time.perf_counter() - started)
                assert len(answer.results) == size
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    pool = [threading.Thread(target=client_thread) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - started
    return len(latencies) * size / elapsed, percentile(latencies, 0.5) * 1000


@contextmanager
def serving(tmp: Path, name: str, *flags: str) -> Iterator[str]:
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    addr = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [sys.executable, "-m", "budgetwarden", "serve", "--listen", addr, "--data-dir", str(tmp / name),
         "--policy-file", str(policy), "--log-level", "WARNING", "--usage-stream-max-len", "10000000",
         "--store-deadline-ms", "30000", *flags],  # a slow moment of a shared machine is no failed call here
        cwd=tmp,
    )  # fmt: skip
    try:
        wait_serving(addr)
        yield addr
    finally:
        server.terminate()
        server.wait(30)


@dataclass(frozen=True)
class Setup:
    label: str
    flags: tuple[str, ...]
    external: bool  # on the Valkey run apart (with its replica) rather than the sidecar's embedded one
    baseline: int  # the row with `none` on the same Valkey, that the ratio is to


SETUPS = (
    Setup("embedded, `--durability none` (appendfsync everysec)", ("--durability", "none"), False, 0),
    Setup("embedded, `aof-local`, the default (appendfsync always)", (), False, 0),
    Setup("external Valkey (appendfsync everysec, 1 replica), `none`", ("--durability", "none"), True, 2),
    Setup("external Valkey, `aof-local` (WAITAOF 1 0 per call)", ("--durability", "aof-local"), True, 2),
    Setup("external Valkey, `replicas` (WAIT 1 per call)", ("--durability", "replicas"), True, 2),
)


def with_replica(tmp: Path, primary_port: int) -> EmbeddedRedis:
    """A replica of the Valkey at ``primary_port``, in sync before it is returned."""
    replica = EmbeddedRedis(tmp / "replica", port=free_port(), persistent=False)
    replica.start()
    with redis.Redis(port=replica.port) as client:
        client.replicaof("127.0.0.1", primary_port)
        give_up = time.monotonic() + 60
        while client.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < give_up, "the replica did not get in sync"
            time.sleep(0.05)
    return replica


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="how long each slice is driven")
    parser.add_argument("--rounds", type=int, default=7, help="slices per row, interleaved with the other rows")
    parser.add_argument("--threads", type=int, default=4, help="client threads")
    parser.add_argument("--write", type=Path, default=None, help="append the result to this Markdown file")
    args = parser.parse_args()

    rates: dict[tuple[int, int], list[float]] = {}
    p50s: dict[tuple[int, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        external = EmbeddedRedis(tmp / "external", port=free_port(), persistent=True, appendfsync="everysec")
        url = external.start()
        stack.callback(external.stop)
        assert external.port is not None
        stack.callback(with_replica(tmp, external.port).stop)
        addrs = [
            stack.enter_context(
                serving(tmp, f"data-{n}", *setup.flags, *(("--redis-url", url) if setup.external else ()))
            )
            for n, setup in enumerate(SETUPS)
        ]
        # All servers run side by side and the rows take turns, slice by slice: a neighbour's load on a shared
        # machine then weighs on every row alike, and each round gives a ratio of its own.
        for _ in range(args.rounds):
            for n, addr in enumerate(addrs):
                for size in SIZES:
                    rate, p50 = drive(addr, size, args.seconds, args.threads)
                    rates.setdefault((n, size), []).append(rate)
                    p50s.setdefault((n, size), []).append(p50)

    def ratio(n: int, size: int) -> float:
        baseline = rates[SETUPS[n].baseline, size]
        return statistics.median(r / b for r, b in zip(rates[n, size], baseline, strict=True))

    lines = [
        f"### Durability: report throughput, appendfsync everysec vs. always ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python bench/durability.py --seconds {args.seconds:g} "
        f"--rounds {args.rounds} --threads {args.threads}` (unary Report calls from {args.threads} client threads; "
        f"the five sidecars run side by side and the rows take turns, {args.rounds} slices of {args.seconds:g} s "
        "each; medians of the slices; the ratio is the median of the slices' ratios to the `none` slice of the same "
        "round on the same Valkey. Valkey's files, its replica, the sidecars and the clients on the same machine and "
        "disk).",
        "",
        "| setup | records per call | records/s | p50 call ms | vs. `none` on the same Valkey |",
        "|---|---|---|---|---|",
        *(
            f"| {setup.label} | {size} | {statistics.median(rates[n, size]):,.0f} | "
            f"{statistics.median(p50s[n, size]):.2f} | {ratio(n, size):.2f} |"
            for n, setup in enumerate(SETUPS)
            for size in SIZES
        ),
        "",
    ]
    publish(lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
