"""Does a fail-mode answer reach a client with a short deadline on a loaded machine? Measured, not assumed.

Sidecars (`budgetwarden serve`), each keeping back another margin from the client's deadline
(`--deadline-margin-ms`; 0 is the old rule, 10% of the deadline alone), in front of a Redis that accepts connections
and never answers (a black hole); and, for the price of a margin, the same sidecars in front of a healthy Valkey.
Every core is kept busy by the bench's own spinning processes. Client threads send checks with 50 and 100 ms
deadlines to each sidecar in turn, in the same run, and count what came back: a decision, the fail-mode answer, or
DEADLINE_EXCEEDED.

    .venv/bin/python bench/deadline_margin.py [--rounds 10] [--margins 0,40] [--write docs/benchmarks.md]
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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
from _common import machine, percentile, publish, wait_serving

from budgetwarden.store._embedded import EmbeddedRedis, free_port
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_api.v1 import budget_pb2_grpc as pb_grpc

SPIN = "while True: pass"


class BlackHole:
    """A TCP server that reads whatever it is sent and never answers: a Redis that hangs. A connection the sidecar
    gives up on (it closes it) is closed here too, so a long run does not run out of file descriptors."""

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        assert ready.wait(10), "the black hole did not start"

    def _serve(self, ready: threading.Event) -> None:
        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await reader.read(65536):
                pass
            writer.close()

        async def main() -> None:
            server = await asyncio.start_server(swallow, "127.0.0.1", self.port, backlog=1024)
            ready.set()
            async with server:
                await server.serve_forever()

        self._loop.run_until_complete(main())


def start_sidecar(redis_url: str, margin_ms: int, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    addr = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [sys.executable, "-m", "budgetwarden", "serve", "--listen", addr, "--data-dir", str(data_dir),
         "--redis-url", redis_url, "--deadline-margin-ms", str(margin_ms), "--log-level", "ERROR"],
        stderr=subprocess.DEVNULL,  # grpc logs each answer that found its deadline gone: counted here instead
    )  # fmt: skip
    wait_serving(addr)
    return process, addr


def one_check(stub: pb_grpc.BudgetServiceStub, deadline_s: float, n: int) -> tuple[str, float]:
    request = pb.CheckRequest(tenant_id="bench", task_id=f"t{n}", step_id="s", estimated_input_tokens=10)
    started = time.perf_counter()
    try:
        answer = stub.Check(request, timeout=deadline_s)
    except grpc.RpcError as exc:
        return exc.code().name, time.perf_counter() - started  # type: ignore[attr-defined]
    return ("fail mode" if answer.from_fail_mode else "decided"), time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="rounds; each sends a batch per deadline")
    parser.add_argument("--batch", type=int, default=40, help="checks per sidecar in a batch")
    parser.add_argument("--threads", type=int, default=6, help="client threads sending checks at once")
    parser.add_argument("--deadlines-ms", default="50,100")
    parser.add_argument("--margins", default="0,40", help="--deadline-margin-ms of each sidecar (0: the old rule)")
    parser.add_argument("--spinners", type=int, default=os.cpu_count() or 2, help="busy processes loading the CPUs")
    parser.add_argument("--write", type=Path, default=None, help="append the results to this Markdown file")
    args = parser.parse_args()
    deadlines = [int(d) for d in args.deadlines_ms.split(",")]
    margins = [int(m) for m in args.margins.split(",")]

    hole = BlackHole()
    stores = ("hung", "healthy")
    keys = [(store, m, d) for store in stores for m in margins for d in deadlines]
    outcomes: dict[tuple[str, int, int], Counter[str]] = {key: Counter() for key in keys}
    answered: dict[tuple[str, int, int], list[float]] = {key: [] for key in keys}
    spinners: list[subprocess.Popen[bytes]] = []
    sidecars: list[subprocess.Popen[bytes]] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedRedis(Path(tmp) / "valkey", port=free_port(), persistent=False) as valkey,
    ):
        urls = {"hung": f"redis://127.0.0.1:{hole.port}/0", "healthy": valkey.url}
        try:
            stubs = {}
            for store in stores:
                for margin in margins:
                    process, addr = start_sidecar(urls[store], margin, Path(tmp) / f"data-{store}-{margin}")
                    sidecars.append(process)
                    stubs[store, margin] = pb_grpc.BudgetServiceStub(grpc.insecure_channel(addr))
                    for n in range(20):  # warm up: connections, first calls
                        one_check(stubs[store, margin], 5.0, -n - 1)
            spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.spinners)]
            time.sleep(1.0)  # let the spinners take the cores
            # Every batch mixes all sidecars, check by check, so each sees the same load at the same moments.
            targets = [(store, margin) for store in stores for margin in margins]
            n = 0
            with ThreadPoolExecutor(args.threads) as pool:
                for _ in range(args.rounds):
                    for deadline in deadlines:
                        sent = [targets[i % len(targets)] for i in range(args.batch * len(targets))]
                        futures = [
                            pool.submit(one_check, stubs[target], deadline / 1000, n + i)
                            for i, target in enumerate(sent)
                        ]
                        n += len(sent)
                        for (store, margin), future in zip(sent, futures, strict=True):
                            outcome, seconds = future.result()
                            outcomes[store, margin, deadline][outcome] += 1
                            if outcome != "DEADLINE_EXCEEDED":
                                answered[store, margin, deadline].append(seconds)
        finally:
            for process in spinners + sidecars:
                process.terminate()
            for process in spinners + sidecars:
                process.wait(30)

    def rule(margin: int) -> str:
        return "10% (old)" if margin == 0 else f"{margin} ms or 10%, at most half"

    def share(counts: Counter[str], outcome: str) -> str:
        total = sum(counts.values())
        return f"{counts[outcome]} ({counts[outcome] / total:.0%})"

    def latency(times: list[float]) -> str:
        if not times:
            return "-"
        return f"{percentile(times, 0.5) * 1e3:.0f} / {percentile(times, 0.99) * 1e3:.0f}"

    lines = [
        f"### Fail-mode answers vs. short client deadlines ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python bench/deadline_margin.py --rounds {args.rounds} "
        f"--batch {args.batch} --threads {args.threads} --margins {args.margins}` ({args.spinners} spinning processes "
        f"keep the cores busy; sidecars, Redis and {args.threads} client threads on the same machine; checks go to "
        f"the sidecars interleaved one by one; {args.rounds * args.batch} checks per cell). Latency is as the client "
        "saw it, for the calls answered.",
        "",
        "| margin kept back | client deadline | Redis hung: fail-mode answer | DEADLINE_EXCEEDED "
        "| answered p50 / p99 ms | Redis healthy: decided | fail-mode answer | DEADLINE_EXCEEDED |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for deadline in deadlines:
        for margin in margins:
            hung, healthy = outcomes["hung", margin, deadline], outcomes["healthy", margin, deadline]
            lines.append(
                f"| {rule(margin)} | {deadline} ms | {share(hung, 'fail mode')} | {share(hung, 'DEADLINE_EXCEEDED')} "
                f"| {latency(answered['hung', margin, deadline])} | {share(healthy, 'decided')} "
                f"| {share(healthy, 'fail mode')} | {share(healthy, 'DEADLINE_EXCEEDED')} |"
            )
    lines.append("")
    publish(lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
