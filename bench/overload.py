"""Overload: unary checks offered at 2x and 5x what one sidecar serves, by a noisy and a quiet tenant.

    .venv/bin/python bench/overload.py [--seconds 10] [--processes 4] [--write docs/benchmarks.md]

First the saturation rate: closed loop (a fixed number of checks in flight) against one `budgetwarden serve` on its own
Valkey. Then open loop at 2x and 5x that rate, from several client processes so the generator is not the bottleneck
(how late it sent its checks is reported): the noisy tenant sends most of the load, the quiet tenant a low fixed rate.
Each check carries the client deadline an agent would give (--client-deadline). For each tenant: p50/p99 of the checks
answered with a decision (from their scheduled time), the share shed (RESOURCE_EXHAUSTED "overloaded:"), the share
answered by the fail mode (the store call missed the check deadline) and the share that missed the client deadline.
Every check asks for tokens of a task with a ceiling; at the end, what the clients were granted per task and what Redis
holds per task are compared with the ceilings read back from Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from hdrh.histogram import HdrHistogram

from budgetwarden.store._embedded import EmbeddedRedis, free_port
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import BudgetClient

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import cpu_seconds, machine, publish, wait_serving  # noqa: E402

CHECK = "/budgetwarden.v1.BudgetService/Check"
POLICY = """
default_tenant: {windows: {day: {tokens: 1000000000000}, month: {tokens: 1000000000000}}}
default_model: {}
default_task_type: agent
task_types:
  agent: {per_task: {tokens: 1000000000000}, per_step: {tokens: 100000}}
"""
TOKENS = 100  # asked by each check
CEILING = 1_000  # of each task: 10 checks' worth, so many tasks reach it
TASKS = {"noisy": 400, "quiet": 20}
GRANTING = (pb.DECISION_ALLOW, pb.DECISION_DEGRADE)


# --- load generation (runs in worker processes) ------------------------------------------------------------------


@dataclass
class Part:
    """What one worker process saw for one tenant."""

    answered: bytes = b""  # HDR histogram (µs) of checks decided by the store, from their scheduled time
    outcomes: Counter[str] = field(default_factory=Counter)
    granted: dict[str, int] = field(default_factory=dict)  # by task
    lateness: bytes = b""  # HDR histogram (µs): how late the generator sent each check


async def _load(job: dict[str, Any]) -> Part:
    answered = HdrHistogram(1, 60_000_000, 3)
    lateness = HdrHistogram(1, 60_000_000, 3)
    part = Part()
    tenant, worker, tasks = job["tenant"], job["worker"], job["tasks"]
    async with grpc.aio.insecure_channel(job["addr"]) as channel:
        call = channel.unary_unary(CHECK, pb.CheckRequest.SerializeToString, pb.CheckResponse.FromString)
        counter = 0

        async def one(scheduled: float) -> None:
            nonlocal counter
            counter += 1
            lateness.record_value(max(1, int((time.perf_counter() - scheduled) * 1e6)))
            task = f"{tenant}-{counter % tasks}"
            request = pb.CheckRequest(
                tenant_id=tenant, task_id=task, step_id=f"{worker}-{counter}", estimated_input_tokens=TOKENS,
                task_ceiling_tokens=CEILING,
            )  # fmt: skip
            try:
                answer = await call(request, timeout=job["deadline"])
            except grpc.aio.AioRpcError as error:
                shed = error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error.details().startswith("overloaded:")
                part.outcomes["shed" if shed else error.code().name] += 1
                return
            if answer.from_fail_mode:
                part.outcomes["fail mode"] += 1
                return
            part.outcomes["answered"] += 1
            answered.record_value(max(1, int((time.perf_counter() - scheduled) * 1e6)))
            if answer.decision in GRANTING:
                part.granted[task] = part.granted.get(task, 0) + answer.granted_tokens

        deadline = time.perf_counter() + job["seconds"]
        if job["mode"] == "closed":

            async def loop() -> None:
                while time.perf_counter() < deadline:
                    await one(time.perf_counter())

            await asyncio.gather(*(loop() for _ in range(job["concurrency"])))
        else:
            interval = 1.0 / job["rate"]
            start = time.perf_counter()
            pending: set[asyncio.Task[None]] = set()
            i = 0
            while (scheduled := start + i * interval) < deadline:
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one(scheduled))
                pending.add(task)
                task.add_done_callback(pending.discard)
                i += 1
            await asyncio.gather(*pending)
    part.answered, part.lateness = answered.encode(), lateness.encode()
    return part


def _worker(job: dict[str, Any]) -> tuple[str, Part]:
    return job["tenant"], asyncio.run(_load(job))


@dataclass
class TenantResult:
    offered: float  # checks/s
    outcomes: Counter[str]
    answered: HdrHistogram
    lateness: HdrHistogram

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    def share(self, outcome: str) -> float:
        return self.outcomes[outcome] / max(1, self.total)

    def ms(self, q: float, histogram: HdrHistogram | None = None) -> float:
        histogram = histogram or self.answered
        return float(histogram.get_value_at_percentile(q)) / 1000 if histogram.get_total_count() else float("nan")


@dataclass
class Scenario:
    name: str
    seconds: float
    tenants: dict[str, TenantResult]
    granted: dict[str, int]
    cpu: dict[str, float]  # share of one core over the scenario, by process


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(jobs: list[dict[str, Any]], name: str, seconds: float, pids: dict[str, int] | None = None) -> Scenario:
    """Runs the jobs, one process each; ``pids``: processes whose CPU over the run is reported (the generators' is)."""
    pids = pids or {}
    ctx = multiprocessing.get_context("spawn")
    before = {what: cpu_seconds(pid) for what, pid in pids.items()}
    generators = _children_cpu()
    with ctx.Pool(len(jobs)) as pool:
        parts = pool.map(_worker, jobs)
        pool.close()
        pool.join()  # reaped, so their CPU time is counted as the children's
    # Over the scenario's own seconds: the sidecar and Valkey idle while the generators start (whose start-up, imports
    # included, is in their figure).
    cpu = {what: (cpu_seconds(pid) - before[what]) / seconds for what, pid in pids.items()}
    cpu["generators"] = (_children_cpu() - generators) / seconds
    tenants: dict[str, TenantResult] = {}
    granted: Counter[str] = Counter()
    for job, (tenant, part) in zip(jobs, parts, strict=True):
        result = tenants.setdefault(
            tenant, TenantResult(0.0, Counter(), HdrHistogram(1, 60_000_000, 3), HdrHistogram(1, 60_000_000, 3))
        )
        result.offered += job.get("rate", 0.0)
        result.outcomes += part.outcomes
        result.answered.add(HdrHistogram.decode(part.answered))
        result.lateness.add(HdrHistogram.decode(part.lateness))
        granted.update(part.granted)
    return Scenario(name, seconds, tenants, dict(granted), cpu)


def open_loop_jobs(
    addr: str, rate: float, quiet_rate: float, processes: int, seconds: float, deadline: float, tag: str
) -> list[dict[str, Any]]:
    """The noisy tenant's rate split over ``processes`` workers, and one worker for the quiet tenant."""
    base = {"addr": addr, "mode": "open", "seconds": seconds, "deadline": deadline}
    noisy = [
        base | {"tenant": "noisy", "rate": (rate - quiet_rate) / processes, "worker": f"{tag}-n{w}",
                "tasks": TASKS["noisy"]}
        for w in range(processes)
    ]  # fmt: skip
    quiet = base | {"tenant": "quiet", "rate": quiet_rate, "worker": f"{tag}-q", "tasks": TASKS["quiet"]}
    return [*noisy, quiet]


# --- over-grant: what Redis holds per task ---------------------------------------------------------------------------


def read_back(addr: str) -> dict[str, tuple[int, int, int]]:
    """(used + reserved, limit, active reservations) of every task, as the store holds them."""
    held: dict[str, tuple[int, int, int]] = {}
    with BudgetClient(addr, timeout=60) as client:
        for tenant, count in TASKS.items():
            for n in range(count):
                task = f"{tenant}-{n}"
                view = client.get_budget(tenant_id=tenant, task_id=task)
                if not view.task_known:
                    continue
                (scope,) = [s for s in view.scopes if s.kind == pb.SCOPE_KIND_TASK]
                held[task] = (scope.used_tokens + scope.reserved_tokens, scope.limit_tokens, view.active_reservations)
    return held


# --- what the figures say ------------------------------------------------------------------------------------------


def findings(scenarios: list[Scenario], client_deadline: float) -> list[str]:
    """Plain statements the table supports: whether the sidecar was the bottleneck, whether shedding engaged, and
    whether the answered checks' p99 stayed well inside the client deadline."""
    notes: list[str] = []
    saturation, *overloads = scenarios
    if saturation.cpu["sidecar"] < 0.8:
        notes.append(
            f"- In the saturation run the sidecar used {saturation.cpu['sidecar']:.0%} of one core: it was not what "
            "limited the rate; the shared machine was. These figures say how this machine behaved, not how far "
            "the sidecar itself goes."
        )
    for scenario in overloads:
        shed = sum(r.outcomes["shed"] for r in scenario.tenants.values())
        p99 = max((r.ms(99) for r in scenario.tenants.values() if r.outcomes["answered"]), default=float("nan"))
        late = max(r.ms(50, r.lateness) for r in scenario.tenants.values())
        bounded = p99 < 0.5 * client_deadline * 1000
        answered = sum(r.outcomes["answered"] for r in scenario.tenants.values()) / scenario.seconds
        saturated = saturation.tenants["noisy"].outcomes["answered"] / saturation.seconds
        verdict = "well inside" if bounded else "not bounded: close to"
        notes.append(
            f"- {scenario.name}: {answered:,.0f} checks/s answered, {answered / saturated:.0%} of the saturation rate, "
            f"with the sidecar at {scenario.cpu['sidecar']:.0%} of a core; {shed:,} checks shed; answered p99 "
            f"{p99:,.0f} ms, {verdict} the {client_deadline:g} s client deadline; the generator sent its checks p50 "
            f"{late:,.1f} ms late" + (" (the generator itself could not keep the rate)." if late > 100 else ".")
        )
    return notes


# --- the run ------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="per scenario")
    parser.add_argument("--processes", type=int, default=4, help="open-loop generator processes of the noisy tenant")
    parser.add_argument("--concurrency", type=int, default=32, help="closed loop: checks in flight per process")
    parser.add_argument("--client-deadline", type=float, default=2.0, help="seconds each check may take (client)")
    parser.add_argument("--quiet-share", type=float, default=0.05, help="the quiet tenant's rate, of saturation")
    parser.add_argument("--multiples", default="2,5", help="offered rates, as multiples of the saturation rate")
    parser.add_argument("--max-checks-in-flight", type=int, default=None, help="the sidecar's bound (its default)")
    parser.add_argument("--tenant-in-flight-share", type=float, default=None, help="(the sidecar's default)")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "BUDGETWARDEN_"))}
    env |= {"OTEL_SDK_DISABLED": "true"}
    serve_flags: list[str] = []
    if args.max_checks_in_flight is not None:
        serve_flags += ["--max-checks-in-flight", str(args.max_checks_in_flight)]
    if args.tenant_in_flight_share is not None:
        serve_flags += ["--tenant-in-flight-share", str(args.tenant_in_flight_share)]
    scenarios: list[Scenario] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        valkey = EmbeddedRedis(Path(tmp) / "valkey", port=free_port(), persistent=True)
        url = valkey.start()
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        addr = f"127.0.0.1:{free_port()}"
        serve = subprocess.Popen(
            [sys.executable, "-m", "budgetwarden", "serve", "--listen", addr, "--redis-url", url,
             "--policy-file", str(policy), "--log-level", "ERROR", *serve_flags],
            env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_serving(addr)
            closed = {"addr": addr, "mode": "closed", "seconds": args.seconds, "concurrency": args.concurrency,
                      "deadline": args.client_deadline, "tenant": "noisy", "tasks": TASKS["noisy"]}  # fmt: skip
            run([closed | {"worker": "warm", "seconds": 1.0}], "warm-up", 1.0)
            assert valkey.pid is not None
            pids = {"sidecar": serve.pid, "Valkey": valkey.pid}
            saturation = run(
                [closed | {"worker": f"sat-{w}"} for w in range(2)], "closed loop (saturation)", args.seconds, pids
            )
            scenarios.append(saturation)
            sat_rate = saturation.tenants["noisy"].outcomes["answered"] / args.seconds
            quiet_rate = max(1.0, args.quiet_share * sat_rate)
            for multiple in (float(m) for m in args.multiples.split(",")):
                jobs = open_loop_jobs(
                    addr, multiple * sat_rate, quiet_rate, args.processes, args.seconds, args.client_deadline,
                    f"x{multiple:g}",
                )  # fmt: skip
                scenarios.append(run(jobs, f"open loop, {multiple:g}x saturation", args.seconds, pids))
            held = read_back(addr)
        finally:
            serve.terminate()
            serve.wait(30)
            valkey.stop()

    granted: Counter[str] = Counter()
    for scenario in scenarios:
        granted.update(scenario.granted)
    over_granted = {task: amount for task, amount in granted.items() if amount > CEILING}
    over_held = {task: used for task, (used, limit, _) in held.items() if used > limit}
    limits = {limit for _, limit, _ in held.values()}
    at_ceiling = sum(1 for used, limit, _ in held.values() if used + TOKENS > limit)
    command = " ".join(["bench/overload.py", *sys.argv[1:]])
    lines = [
        f"### Overload: unary checks at 2x and 5x saturation, a noisy and a quiet tenant "
        f"({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python {command}` (one `budgetwarden serve` on its own Valkey "
        f"with AOF everysec, its default bound and tenant share unless the command sets them; metrics off; "
        f"saturation: 2 processes x {args.concurrency} checks in flight, closed loop; open loop: {args.processes} "
        f"processes for the noisy tenant and one for the quiet tenant at {args.quiet_share:.0%} of saturation; "
        f"client deadline {args.client_deadline:g} s; {args.seconds:g} s per scenario; every check asks {TOKENS} "
        f"tokens of one of {TASKS['noisy']} (noisy) or {TASKS['quiet']} (quiet) tasks with a ceiling of "
        f"{CEILING:,}; generator, sidecar and Valkey share the 2 cores). Latency counts from each check's scheduled "
        "time, so it includes how late the generator sent it (last columns). Answered: decided by the store; shed: "
        'RESOURCE_EXHAUSTED "overloaded:"; fail mode: the store call missed the check deadline; deadline: the '
        "client's deadline passed first.",
        "",
        "| scenario | tenant | offered checks/s | answered checks/s | answered p50 ms | answered p99 ms | shed "
        "| fail mode | deadline | other errors | generator late p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario in scenarios:
        for tenant, r in sorted(scenario.tenants.items()):
            offered = f"{r.offered:,.0f}" if r.offered else "closed loop"
            other = r.total - sum(r.outcomes[k] for k in ("answered", "shed", "fail mode", "DEADLINE_EXCEEDED"))
            lines.append(
                f"| {scenario.name} | {tenant} | {offered} | {r.outcomes['answered'] / scenario.seconds:,.0f} | "
                f"{r.ms(50):.1f} | {r.ms(99):.1f} | {r.share('shed'):.1%} | {r.share('fail mode'):.1%} | "
                f"{r.share('DEADLINE_EXCEEDED'):.1%} | {other} | {r.ms(50, r.lateness):.1f} / "
                f"{r.ms(99, r.lateness):.1f} |"
            )
    known = {"answered", "shed", "fail mode", "DEADLINE_EXCEEDED"}
    others = Counter[str]()
    for scenario in scenarios:
        for r in scenario.tenants.values():
            others.update({name: count for name, count in r.outcomes.items() if name not in known})
    lines += [
        "",
        "CPU time over each scenario's seconds, as a share of one core (the generators' includes their start-up):",
        "",
        "| scenario | sidecar | Valkey | generators |",
        "|---|---|---|---|",
        *[
            f"| {s.name} | {s.cpu['sidecar']:.0%} | {s.cpu['Valkey']:.0%} | {s.cpu['generators']:.0%} |"
            for s in scenarios
        ],
    ]
    lines += [
        "",
        f"- Saturation: {sat_rate:,.0f} checks/s answered in closed loop.",
        f"- The machine's 1-minute load average: {load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after "
        "(other work shares these 2 cores).",
        f"- Other errors, all scenarios: {dict(others) or 'none'}.",
        *findings(scenarios, args.client_deadline),
        f"- Over-grant: {len(granted)} tasks were granted tokens, {sum(granted.values()):,} in all; the most any task "
        f"was granted is {max(granted.values(), default=0):,} against its ceiling of {CEILING:,} (read back from "
        f"Redis: {sorted(limits)}); {len(over_granted)} tasks over it. Redis holds (used + reserved) at most "
        f"{max((u for u, _, _ in held.values()), default=0):,} for a task; {len(over_held)} over the ceiling; "
        f"{at_ceiling} tasks are at their ceiling.",
        "",
    ]
    publish(lines, args.write)
    return 1 if over_granted or over_held else 0


if __name__ == "__main__":
    sys.exit(main())
