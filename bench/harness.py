"""The check benchmark: budgetwarden against its baselines, in one run, with ratios.

    .venv/bin/python bench/harness.py [--seconds 10] [--write docs/benchmarks.md]     (make bench)
    .venv/bin/python bench/harness.py --smoke                                          (a second per scenario)
    .venv/bin/python bench/harness.py --checkstream [--rounds 3] [--baseline-src DIR]  (CheckStream only, A/B)

Servers (each its own process): the transport floor and the naive one-EVALSHA handler (bench/baselines.py), and
`budgetwarden serve`, all on one Valkey with an append-only file. Load comes from separate OS processes running
grpc.aio clients: closed loop at fixed concurrency for throughput, open loop at a fixed rate for latency (measured
from each request's scheduled time, so a stall is not hidden by the load generator waiting). Every check uses a
distinct step id. Latencies go into HDR histograms merged across processes.

`--checkstream` measures only CheckStream (100 checks per message, 1 task and 1,000 tasks): the sidecar as it is, the
same with `--no-lean-redis-client` (checks on redis-py), and, with `--baseline-src DIR` (e.g. a `git archive` of
main), the sidecar of that source tree, alternating in each round, so that their ratios come from the same minutes of
a shared machine. It also reports the load generator's own CPU per check, which shares the cores with the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import redis
from google.protobuf.internal.encoder import _VarintBytes
from hdrh.histogram import HdrHistogram

from budgetwarden.store._embedded import EmbeddedRedis, free_port
from budgetwarden_api.v1 import budget_pb2 as pb

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import cpu_seconds, machine, publish, wait_serving  # noqa: E402

CHECK = "/budgetwarden.v1.BudgetService/Check"
CHECK_STREAM = "/budgetwarden.v1.BudgetService/CheckStream"
POLICY = """
default_tenant: {windows: {day: {tokens: 1000000000000}, month: {tokens: 1000000000000}}}
tenants:
  tight: {windows: {minute: {tokens: 50000}}}
default_model: {}
default_task_type: agent
task_types:
  agent: {per_task: {tokens: 1000000000000}, per_step: {tokens: 100000}}
"""


# --- load generation (runs in worker processes) ------------------------------------------------------------------


def _request_prefix(tenant: str) -> bytes:
    """Everything but the task and step; serialized once (protobuf merges concatenated messages)."""
    return pb.CheckRequest(tenant_id=tenant, estimated_input_tokens=800, max_output_tokens=200).SerializeToString()


async def _load(job: dict[str, Any]) -> tuple[bytes, int, int, bytes, float]:
    cpu_started = time.process_time()
    histogram = HdrHistogram(1, 60_000_000, 3)
    # Open loop: how late the generator itself sent each check (its timer and its share of the cores), which the
    # latency from the schedule includes.
    lateness = HdrHistogram(1, 60_000_000, 3)
    prefix = _request_prefix(job["tenant"])
    tasks = job["tasks"]
    worker = job["worker"]
    errors = 0
    done = 0
    async with grpc.aio.insecure_channel(job["addr"]) as channel:
        call = channel.unary_unary(CHECK)
        counter = 0

        def next_request() -> bytes:
            nonlocal counter
            counter += 1
            # Uniform over the tasks (round robin would reach only the first few thousand of a large N in a run).
            task = f"task-{random.randrange(tasks)}" if tasks > 1 else "task-0"
            tail = pb.CheckRequest(task_id=task, step_id=f"{worker}-{counter}-{time.time_ns()}").SerializeToString()
            return prefix + tail

        async def one(scheduled: float) -> None:
            nonlocal errors, done
            lateness.record_value(max(1, int((time.perf_counter() - scheduled) * 1e6)))
            try:
                answer = await call(next_request(), timeout=job["rpc_timeout"])
            except grpc.aio.AioRpcError:
                errors += 1
                return
            if pb.CheckResponse.FromString(answer).from_fail_mode:  # the store missed the deadline: no decision
                errors += 1
                return
            histogram.record_value(max(1, int((time.perf_counter() - scheduled) * 1e6)))
            done += 1

        deadline = time.perf_counter() + job["seconds"]
        if job["mode"] == "stream":
            open_stream = channel.stream_stream(CHECK_STREAM)
            batch = job["batch"]

            async def stream_loop() -> None:
                """One stream, one message in flight: a batch of checks, then its answer, then the next."""
                nonlocal errors, done
                call = open_stream(timeout=job["seconds"] + 30)
                while time.perf_counter() < deadline:
                    message = b"".join(_stream_field(next_request()) for _ in range(batch))
                    sent = time.perf_counter()
                    await call.write(message)
                    answer = pb.CheckStreamResponse.FromString(await call.read())
                    histogram.record_value(max(1, int((time.perf_counter() - sent) * 1e6)))
                    # A refusal or an answer from the fail mode (the store call missed its deadline) is no decision.
                    refused = sum(
                        1 for result in answer.results if result.HasField("error") or result.response.from_fail_mode
                    )
                    errors += refused + batch - len(answer.results)
                    done += len(answer.results) - refused
                await call.done_writing()

            await asyncio.gather(*(stream_loop() for _ in range(job["concurrency"])))
        elif job["mode"] == "closed":

            async def loop() -> None:
                while time.perf_counter() < deadline:
                    await one(time.perf_counter())

            await asyncio.gather(*(loop() for _ in range(job["concurrency"])))
        else:
            interval = 1.0 / job["rate"]
            start = time.perf_counter()
            pending: set[asyncio.Task[None]] = set()
            i = 0
            while True:
                scheduled = start + i * interval
                if scheduled >= deadline:
                    break
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one(scheduled))
                pending.add(task)
                task.add_done_callback(pending.discard)
                i += 1
            await asyncio.gather(*pending)
    return histogram.encode(), done, errors, lateness.encode(), time.process_time() - cpu_started


def _stream_field(check: bytes) -> bytes:
    """A serialized CheckRequest as one element of CheckStreamRequest.checks (field 2, length-delimited)."""
    return b"\x12" + _VarintBytes(len(check)) + check


def _worker(job: dict[str, Any]) -> tuple[bytes, int, int, bytes, float]:
    return asyncio.run(_load(job))


@dataclass
class Result:
    name: str
    server: str
    rate: float
    p50: float
    p90: float
    p99: float
    p999: float
    max: float
    errors: int
    seconds: float = 0.0
    server_us: float = float("nan")  # CPU of the server process per check
    redis_us: float = float("nan")  # CPU of Valkey per check
    late_p50: float = 0.0  # open loop: how late the generator sent, ms
    late_p99: float = 0.0
    generator_us: float = float("nan")  # CPU of the load generator's workers per check (their load loop only)


# How long one unary check may take before the generator counts it as an error. A smoke run (a test, on a machine that
# may be busy with anything) only asks whether every check is answered, so it waits much longer.
# The load is one tenant's, and its CheckStream scenarios hold up to 400 checks in flight (2 processes x 2 streams x
# 100): past the default share one tenant may hold (0.75 of --max-checks-in-flight 512, a fairness bound between
# tenants) about 3% of them were refused, which read as errors. The share goes to all of it here.
ONE_TENANT = {"BUDGETWARDEN_TENANT_IN_FLIGHT_SHARE": "1"}


def servers_env() -> dict[str, str]:
    """The servers' environment: metrics off (no OTLP exporter inherited), the one tenant given all checks in flight."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return inherited | {"OTEL_SDK_DISABLED": "true"} | ONE_TENANT


RPC_TIMEOUT_S = 10.0
SMOKE_RPC_TIMEOUT_S = 120.0


def run_load(
    name: str, server: str, addr: str, *, mode: str, seconds: float, processes: int, concurrency: int = 16,
    rate: float = 0.0, tasks: int = 1, tenant: str = "bench", batch: int = 1,
) -> Result:  # fmt: skip
    jobs = [
        {"addr": addr, "mode": mode, "seconds": seconds, "concurrency": concurrency, "rate": rate / processes,
         "tasks": tasks, "tenant": tenant, "batch": batch, "worker": f"{server}-{name}-{w}",
         "rpc_timeout": RPC_TIMEOUT_S}
        for w in range(processes)
    ]  # fmt: skip
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        parts = pool.map(_worker, jobs)
    merged = HdrHistogram(1, 60_000_000, 3)
    late = HdrHistogram(1, 60_000_000, 3)
    done = errors = 0
    generator_cpu = 0.0
    for encoded, count, failed, lateness, cpu in parts:
        generator_cpu += cpu
        merged.add(HdrHistogram.decode(encoded))
        late.add(HdrHistogram.decode(lateness))
        done += count
        errors += failed
    ms = 1000.0
    return Result(
        name, server, done / seconds,
        merged.get_value_at_percentile(50) / ms, merged.get_value_at_percentile(90) / ms,
        merged.get_value_at_percentile(99) / ms, merged.get_value_at_percentile(99.9) / ms,
        merged.get_max_value() / ms, errors, seconds,
        late_p50=late.get_value_at_percentile(50) / ms, late_p99=late.get_value_at_percentile(99) / ms,
        generator_us=generator_cpu / max(1, done) * 1e6,
    )  # fmt: skip


# --- servers ------------------------------------------------------------------------------------------------------


def wait_port(addr: str, timeout: float = 30.0) -> None:
    with grpc.insecure_channel(addr) as channel:
        grpc.channel_ready_future(channel).result(timeout)


def with_cpu(server_pid: int, redis_pid: int, load: Callable[[], Result]) -> Result:
    """Runs a load and adds what the server and Valkey spent in CPU per answered check."""
    server, store = cpu_seconds(server_pid), cpu_seconds(redis_pid)
    result = load()
    checks = max(1.0, result.rate * result.seconds)
    result.server_us = (cpu_seconds(server_pid) - server) / checks * 1e6
    result.redis_us = (cpu_seconds(redis_pid) - store) / checks * 1e6
    return result


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL)


# --- CheckStream only (--checkstream) ------------------------------------------------------------------------------


def checkstream_main(args: argparse.Namespace) -> int:
    seconds = 1.0 if args.smoke else args.seconds
    rounds = 1 if args.smoke else args.rounds
    env = servers_env()
    servers: dict[str, tuple[list[str], dict[str, str]]] = {
        "budgetwarden": ([], env),
        "budgetwarden, redis-py client": (["--no-lean-redis-client"], env),
    }
    if args.baseline_src is not None:
        source = args.baseline_src.resolve()
        baseline_env = env | {"PYTHONPATH": f"{source / 'server'}:{source / 'clients' / 'python'}"}
        servers[f"baseline ({args.baseline_src.name})"] = ([], baseline_env)
    results: list[tuple[int, Result]] = []
    with tempfile.TemporaryDirectory() as tmp:
        valkey = EmbeddedRedis(Path(tmp) / "valkey", port=free_port(), persistent=True)
        url = valkey.start()
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        addrs = {name: f"127.0.0.1:{free_port()}" for name in servers}
        processes: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for name, (extra, server_env) in servers.items():
                processes[name] = start(
                    ["-m", "budgetwarden", "serve", "--listen", addrs[name], "--redis-url", url, "--policy-file",
                     str(policy), "--log-level", "WARNING", "--usage-stream-max-len", "10000000", *extra], server_env,
                )  # fmt: skip
                wait_serving(addrs[name])
            redis_pid = valkey.pid
            assert redis_pid is not None
            for name in servers:
                run_load("warm-up", name, addrs[name], mode="stream", concurrency=2, batch=100,
                         seconds=min(1.0, seconds), processes=1)  # fmt: skip
            for round_number in range(1, rounds + 1):
                for tasks in (1, 1000):
                    scenario = f"CheckStream, 100 checks per message, {tasks:,} task{'s' if tasks > 1 else ''}"
                    for name in servers:
                        result = with_cpu(
                            processes[name].pid,
                            redis_pid,
                            lambda name=name, tasks=tasks, scenario=scenario: run_load(  # type: ignore[misc]
                                scenario, name, addrs[name], mode="stream", concurrency=2, batch=100, tasks=tasks,
                                seconds=seconds, processes=args.processes,
                            ),
                        )  # fmt: skip
                        results.append((round_number, result))
                        print(f"{round_number} {scenario:45s} {name:30s} {result.rate:8,.0f}/s", flush=True)
        finally:
            for process in processes.values():
                process.terminate()
                process.wait(30)
            valkey.stop()
    command = f".venv/bin/python bench/harness.py --checkstream --seconds {seconds:g} --rounds {rounds}"
    if args.baseline_src is not None:
        command += f" --baseline-src {args.baseline_src}"
    lines = [
        f"### CheckStream: the sidecar, on redis-py, and a baseline, alternating "
        f"({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Command: `{command}` ({args.processes} load-generator processes of grpc.aio clients, "
        "2 streams each, one 100-check message in flight per stream; every check a new step; Valkey with AOF "
        "everysec; servers, Valkey and load generator on the same 2 cores, shared with other work; metrics off; one "
        "tenant, given all of --max-checks-in-flight: --tenant-in-flight-share 1). Errors: refused checks and "
        "fail-mode answers. CPU: each process's CPU time over the measurement per answered "
        "check; the load generator's: its workers' CPU over their load loop (it builds and parses every check in "
        "Python on the same cores).",
        "",
        "| round | scenario | server | checks/s | p50 ms per message | p99 ms | errors | server CPU µs/check "
        "| Valkey CPU µs/check | load generator CPU µs/check |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for round_number, r in results:
        lines.append(
            f"| {round_number} | {r.name} | {r.server} | {r.rate:,.0f} | {r.p50:.2f} | {r.p99:.2f} | {r.errors} | "
            f"{r.server_us:.0f} | {r.redis_us:.0f} | {r.generator_us:.0f} |"
        )
    lines.append("")
    publish(lines, None if args.smoke else args.write)
    return 0


# --- the run ------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="per scenario")
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument("--smoke", action="store_true", help="one second per scenario, nothing written")
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--checkstream", action="store_true", help="CheckStream only, A/B")
    parser.add_argument("--rounds", type=int, default=3, help="with --checkstream: rounds of alternation")
    parser.add_argument("--baseline-src", type=Path, default=None, help="with --checkstream: a source tree to compare")
    args = parser.parse_args()
    if args.checkstream:
        return checkstream_main(args)
    seconds = 1.0 if args.smoke else args.seconds
    if args.smoke:
        global RPC_TIMEOUT_S
        RPC_TIMEOUT_S = SMOKE_RPC_TIMEOUT_S
    results: list[Result] = []
    notes: list[str] = []
    env = servers_env()

    with tempfile.TemporaryDirectory() as tmp:
        valkey = EmbeddedRedis(Path(tmp) / "valkey", port=free_port(), persistent=True)
        url = valkey.start()
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        addrs = {name: f"127.0.0.1:{free_port()}" for name in ("floor", "naive", "budgetwarden")}
        # The sidecar starts alone, so that its time to SERVING is not shared with the baselines' start.
        launched = time.perf_counter()
        processes = {
            "budgetwarden": start(
                ["-m", "budgetwarden", "serve", "--listen", addrs["budgetwarden"], "--redis-url", url,
                 "--policy-file", str(policy), "--log-level", "WARNING", "--usage-stream-max-len", "10000000"], env,
            )
        }  # fmt: skip
        try:
            wait_serving(addrs["budgetwarden"])
            ready = time.perf_counter() - launched
            processes["floor"] = start([str(HERE / "baselines.py"), "floor", "--listen", addrs["floor"]], env)
            processes["naive"] = start(
                [str(HERE / "baselines.py"), "naive", "--listen", addrs["naive"], "--redis-url", url], env
            )
            for name in ("floor", "naive"):
                wait_port(addrs[name])
            time.sleep(1.0)
            idle_rss = rss_mb(processes["budgetwarden"].pid)
            notes.append(
                f"budgetwarden serve (external Redis): SERVING {ready:.2f} s after launch; {idle_rss:.0f} MB RSS idle"
            )
            redis_pid = valkey.pid
            assert redis_pid is not None

            def measure(name: str, server: str, **load: Any) -> None:
                results.append(
                    with_cpu(
                        processes[server].pid,
                        redis_pid,
                        lambda: run_load(
                            name, server, addrs[server], seconds=seconds, processes=args.processes, **load
                        ),
                    )
                )

            for server in ("floor", "naive", "budgetwarden"):
                run_load("warm-up", server, addrs[server], mode="closed", seconds=min(1.0, seconds), processes=1)
            for server in ("floor", "naive", "budgetwarden"):
                measure("closed loop, one task", server, mode="closed")
            for tasks in (1000,) if args.smoke else (1000, 100_000):
                measure(f"closed loop, {tasks:,} tasks (each check a random one)", "budgetwarden", mode="closed",
                        tasks=tasks)  # fmt: skip
            measure("closed loop, near the limit (one tenant, mostly denied)", "budgetwarden", mode="closed",
                    tenant="tight", tasks=50)  # fmt: skip
            for batch, tasks in ((10, 1), (100, 1), (100, 1000)):
                name = f"CheckStream, {batch} checks per message, {tasks:,} task{'s' if tasks > 1 else ''}"
                measure(name, "budgetwarden", mode="stream", concurrency=2, batch=batch, tasks=tasks)
            # 100/s is a lightly loaded sidecar (one pod's agents); 1,000/s is the target's load.
            for rate in (100, 1000):
                for server in ("floor", "budgetwarden"):
                    measure(f"open loop, {rate:,} checks/s", server, mode="open", rate=rate)
            loaded_rss = rss_mb(processes["budgetwarden"].pid)
            notes.append(f"budgetwarden serve after the load: {loaded_rss:.0f} MB RSS")
            client = redis.Redis.from_url(url)
            keys = client.dbsize()
            memory = client.info("memory")["used_memory"]
            tasks_known = sum(1 for _ in client.scan_iter(match="bw1:*:task:*", count=10_000))
            records = sum(1 for _ in client.scan_iter(match="bw1:*:resv:*", count=10_000))
            client.close()
            if tasks_known:
                notes.append(
                    f"Redis after the run: {keys:,} keys ({tasks_known:,} tasks, {records:,} reservation records), "
                    f"{memory / 2**20:.0f} MiB used: about {memory / records:.0f} bytes per reservation record with "
                    "its share of the rest (records expire after lease + retention, tasks after the task retention; "
                    "bench/scale.py measures the memory per active task)"
                )
        finally:
            for process in processes.values():
                process.terminate()
                process.wait(30)
            valkey.stop()

        embedded_dir = Path(tmp) / "embedded"
        port = free_port()
        launched = time.perf_counter()
        embedded = start(["-m", "budgetwarden", "serve", "--listen", f"127.0.0.1:{port}", "--data-dir",
                          str(embedded_dir), "--log-level", "WARNING"], env)  # fmt: skip
        try:
            wait_serving(f"127.0.0.1:{port}")
            took = time.perf_counter() - launched
            notes.append(f"budgetwarden serve (embedded default, starts Valkey): SERVING {took:.2f} s after launch")
        finally:
            embedded.terminate()
            embedded.wait(30)

    floor = next(r.rate for r in results if r.server == "floor" and r.name.startswith("closed loop, one"))
    lines = [
        f"### Checks: budgetwarden vs. its baselines ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python bench/harness.py --seconds {seconds:g}` "
        f"({args.processes} load-generator processes of grpc.aio clients, 16 in flight each in closed loop; Valkey "
        "with AOF everysec; servers, Valkey and load on the same 2 cores; metrics off; one tenant, given all of "
        "--max-checks-in-flight: --tenant-in-flight-share 1). Errors: failed calls, refused "
        "checks and answers from the fail mode (a store call past the check deadline). CPU: the server's and Valkey's "
        "CPU time over the scenario per answered check.",
        "",
        "| scenario | server | checks/s | vs. floor | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors "
        "| server CPU µs/check | Valkey CPU µs/check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.server} | {r.rate:,.0f} | {r.rate / floor:.2f} | {r.p50:.2f} | {r.p90:.2f} | "
            f"{r.p99:.2f} | {r.p999:.2f} | {r.max:.2f} | {r.errors} | {r.server_us:.0f} | {r.redis_us:.0f} |"
        )
    notes += [
        f"{r.name}, {r.server}: the load generator sent its checks p50 {r.late_p50:.2f} ms, p99 {r.late_p99:.2f} ms "
        "after their schedule (asyncio's timer and the shared cores); the latency columns count from the schedule, "
        "so they include this"
        for r in results
        if r.name.startswith("open loop")
    ]
    lines += ["", *[f"- {note}" for note in notes], ""]
    publish(lines, None if args.smoke else args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
