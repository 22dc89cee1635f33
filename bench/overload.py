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

With --compare-fairness (h2load), each open-loop scenario runs again right after against a sidecar with fairness
between tenants off (--overload-busy-share 0), on the same Valkey, and a closed loop against a sidecar that refuses
every noisy check in its handler measures what such a refusal costs the sidecar's CPU against a decided check.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
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
from _common import (  # noqa: E402
    STEP_MARK,
    TASK_MARK,
    build_shim,
    cpu_seconds,
    machine,
    percentile,
    publish,
    wait_serving,
    write_grpc_body,
)

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
TASKS = {"noisy": 400, "quiet": 20, "probe": 20}  # probe: --generator h2load only
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


def read_back(addr: str, digits: int = 0) -> dict[str, tuple[int, int, int]]:
    """(used + reserved, limit, active reservations) of every task, as the store holds them; ``digits``: the task
    number's zero-padded width (bench/vary_body.c pads it to 4)."""
    held: dict[str, tuple[int, int, int]] = {}
    with BudgetClient(addr, timeout=60) as client:
        for tenant, count in TASKS.items():
            for n in range(count):
                task = f"{tenant}-{n:0{digits}d}"
                for attempt in range(5):
                    try:
                        view = client.get_budget(tenant_id=tenant, task_id=task)
                        break
                    except grpc.RpcError as error:
                        print(f"read-back {task} attempt {attempt}: {error.code()} {error.details()}", file=sys.stderr)
                        if attempt == 4:
                            raise
                        time.sleep(0.5)
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


# --- the h2load generator ------------------------------------------------------------------------------------------
# h2load (C, Debian's nghttp2-client) sends the checks: it costs far less per check than the sidecar, so an offered
# rate is what the sidecar is offered. It posts one body per request; bench/vary_body.c (preloaded, copied verbatim
# from feat/perf's bench/h2load.py approach) writes a counter into the step and the counter modulo VARY_TASKS into the
# task of what each read returns. It cannot read grpc-status: outcomes come from the sidecar's own metrics.


def grpc_body(path: Path, tenant: str, tag: str) -> Path:
    """A length-prefixed CheckRequest whose task (of TASKS[tenant]) and step the shim varies per request."""
    message = pb.CheckRequest(
        tenant_id=tenant, task_id=f"{tenant}-{TASK_MARK}", step_id=f"{tag}-{STEP_MARK}", estimated_input_tokens=TOKENS,
        task_ceiling_tokens=CEILING,
    ).SerializeToString()  # fmt: skip
    return write_grpc_body(path, message)


@dataclass
class H2Run:
    """One h2load process: one tenant's checks."""

    tenant: str
    offered: float  # checks/s, 0 for closed loop
    command: list[str]
    log: Path
    process: subprocess.Popen[str] | None = None
    starts_us: list[float] = field(default_factory=list)
    latencies_us: list[float] = field(default_factory=list)  # request start to the end of the response
    failed: int = 0  # h2load's failed + errored + timeout (no response at all)
    took: float = 0.0


def h2load_run(addr: str, tenant: str, tag: str, tmp: Path, *, seconds: float, deadline: float, clients: int,
               streams: int, rps: float = 0.0) -> H2Run:  # fmt: skip
    body = grpc_body(tmp / f"body-{tag}", tenant, tag)
    log = tmp / f"log-{tag}"
    command = [
        "h2load", f"-c{clients}", f"-m{streams}", "-t1", f"-D{int(seconds * 1000)}ms", "-d", str(body),
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        "-H", f"grpc-timeout: {int(deadline * 1000)}m", f"--log-file={log}",
        f"http://{addr}/budgetwarden.v1.BudgetService/Check",
    ]  # fmt: skip
    if rps:
        command[1:1] = [f"--rps={max(1, round(rps / clients))}"]
    return H2Run(tenant, rps, command, log)


def h2load_start(run: H2Run, shim: Path) -> None:
    env = os.environ | {"LD_PRELOAD": str(shim), "VARY_TASKS": str(TASKS[run.tenant])}
    run.process = subprocess.Popen(run.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def h2load_finish(run: H2Run) -> None:
    assert run.process is not None
    out, _ = run.process.communicate(timeout=600)
    if run.process.returncode:
        raise RuntimeError(f"h2load failed ({run.process.returncode}): {out}")
    for line in out.splitlines():
        if line.startswith("requests:"):
            parts = {word: int(count) for count, word in _pairs(line.split(":", 1)[1])}
            run.failed = parts["failed"] + parts["errored"] + parts["timeout"]
        elif line.startswith("finished in"):
            run.took = float(line.split()[2].rstrip("s,"))
    rows = []
    for line in run.log.read_text().splitlines():
        start_us, status, took_us = line.split("\t")[:3]
        if status == "200":
            rows.append((float(start_us), float(took_us)))
    rows.sort()
    run.starts_us, run.latencies_us = [r[0] for r in rows], [r[1] for r in rows]


def _pairs(text: str) -> list[tuple[str, str]]:
    """h2load's "N total, N started, ..." as (count, word) pairs."""
    return [(part.split()[0], part.split()[1]) for part in text.split(",") if len(part.split()) >= 2]


def late_us(run: H2Run) -> list[float]:
    """How far behind an even schedule at the offered rate from its first request h2load started each request."""
    if not run.starts_us or not run.offered:
        return []
    first = run.starts_us[0]
    return [max(0.0, at - (first + i * 1e6 / run.offered)) for i, at in enumerate(run.starts_us)]


# --- the sidecar's own counts (its Prometheus endpoint) -------------------------------------------------------------

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(port: int) -> Counter[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every sample of the sidecar's /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    samples: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
    for line in text.splitlines():
        if line.startswith("#") or not (match := _SAMPLE.match(line)):
            continue
        labels = tuple(sorted(_LABEL.findall(match["labels"] or "")))
        samples[(match["name"], labels)] = float(match["value"])  # type: ignore[assignment]
    return samples


def counted(samples: Counter[Any], name: str, **want: str) -> float:
    """The sum of ``name``'s samples whose labels include ``want``."""
    return sum(v for (n, labels), v in samples.items() if n == name and set(want.items()) <= set(labels))


def duration_quantile(samples: Counter[Any], q: float) -> float:
    """The sidecar's check duration (validation to decision) at quantile ``q``, in ms: the upper bound of the bucket
    it falls in (budgetwarden_check_duration_seconds, all decisions)."""
    buckets: Counter[float] = Counter()
    for (name, labels), value in samples.items():
        if name == "budgetwarden_check_duration_seconds_bucket":
            buckets[float(dict(labels)["le"])] += value
    total = buckets.get(float("inf"), 0)
    if not total:
        return float("nan")
    for bound in sorted(buckets):
        if buckets[bound] >= q * total:
            return bound * 1000
    return float("inf")


@dataclass
class Probe:
    """A few checks a second from this process (tenant "probe", gRPC's Python client), which sees what h2load cannot:
    each answer's status and how long it took. A sample of what every caller got."""

    outcomes: Counter[str] = field(default_factory=Counter)
    answered_us: list[float] = field(default_factory=list)  # checks decided by the store (not the fail mode)


def probe(addr: str, rate: float, seconds: float, deadline: float, tag: str) -> Probe:
    result = Probe()
    with grpc.insecure_channel(addr) as channel:
        call = channel.unary_unary(CHECK, pb.CheckRequest.SerializeToString, pb.CheckResponse.FromString)
        sent: list[grpc.Future[pb.CheckResponse]] = []
        took: dict[int, float] = {}  # seconds from each check's sending to its answer (set by gRPC's thread)
        start = time.perf_counter()
        while (at := start + len(sent) / rate) < start + seconds:
            time.sleep(max(0.0, at - time.perf_counter()))
            n = len(sent)
            request = pb.CheckRequest(
                tenant_id="probe", task_id=f"probe-{n % TASKS['probe']:04d}", step_id=f"{tag}-{n}",
                estimated_input_tokens=TOKENS, task_ceiling_tokens=CEILING,
            )  # fmt: skip
            sent_at = time.perf_counter()
            pending = call.future(request, timeout=deadline)
            pending.add_done_callback(lambda _, n=n, at=sent_at: took.__setitem__(n, time.perf_counter() - at))  # type: ignore[misc]
            sent.append(pending)
        for n, future in enumerate(sent):
            try:
                answer = future.result()
            except grpc.RpcError as error:
                code, details = error.code(), error.details() or ""
                shed = code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("overloaded:")
                result.outcomes["shed" if shed else code.name] += 1
                continue
            result.outcomes["fail mode" if answer.from_fail_mode else "answered"] += 1
            if not answer.from_fail_mode and n in took:
                result.answered_us.append(took[n] * 1e6)
    return result


@dataclass
class H2Scenario:
    name: str
    seconds: float
    runs: list[H2Run]
    metrics: Counter[Any]  # what the sidecar counted over the scenario
    cpu: dict[str, float]
    probe: Probe | None = None

    def decided(self, tenant: str) -> float:
        return counted(self.metrics, "budgetwarden_check_decisions_total", budgetwarden_tenant=tenant)

    def fail_mode(self, tenant: str) -> float:
        return sum(
            counted(self.metrics, "budgetwarden_check_decisions_total", budgetwarden_tenant=tenant,
                    budgetwarden_reason=reason)
            for reason in ("FAIL_OPEN", "FAIL_CLOSED")
        )  # fmt: skip

    def shed(self, tenant: str) -> float:
        return counted(self.metrics, "budgetwarden_check_shed_total", budgetwarden_tenant=tenant)


def h2load_scenario(
    name: str, runs: list[H2Run], shim: Path, metrics_port: int, pids: dict[str, int], seconds: float,
    addr: str = "", probe_rate: float = 0.0, deadline: float = 0.0,
) -> H2Scenario:  # fmt: skip
    before = scrape(metrics_port)
    cpu = {what: cpu_seconds(pid) for what, pid in pids.items()}
    generators = _children_cpu()
    for run in runs:
        h2load_start(run, shim)
    sampled = probe(addr, probe_rate, seconds, deadline, name) if probe_rate else None
    for run in runs:
        h2load_finish(run)
    took = max(run.took for run in runs) or seconds
    used = {what: (cpu_seconds(pid) - cpu[what]) / took for what, pid in pids.items()}
    used["h2load"] = (_children_cpu() - generators) / took
    after = scrape(metrics_port)
    after.subtract(before)
    return H2Scenario(name, took, runs, after, used, sampled)


FAIRNESS_OFF = ", fairness off (--overload-busy-share 0)"
REFUSAL_SCENARIO = "closed loop, every noisy check refused (--overload-busy-share 0.01)"


@dataclass
class Sidecar:
    process: subprocess.Popen[bytes]
    addr: str
    metrics_port: int


def start_sidecar(url: str, policy: Path, env: dict[str, str], flags: list[str]) -> Sidecar:
    addr, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "budgetwarden", "serve", "--listen", addr, "--redis-url", url,
         "--policy-file", str(policy), "--log-level", "ERROR", "--metrics-port", str(metrics_port), *flags],
        env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return Sidecar(process, addr, metrics_port)


def h2load_main(args: argparse.Namespace) -> int:
    if shutil.which("h2load") is None:
        raise SystemExit("--generator h2load needs h2load (Debian: apt-get install nghttp2-client)")
    # Metrics on (the outcomes are the sidecar's counts), no OTLP export.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "BUDGETWARDEN_"))}
    serve_flags: list[str] = []
    if args.max_checks_in_flight is not None:
        serve_flags += ["--max-checks-in-flight", str(args.max_checks_in_flight)]
    if args.tenant_in_flight_share is not None:
        serve_flags += ["--tenant-in-flight-share", str(args.tenant_in_flight_share)]
    if args.max_pending_calls is not None:
        serve_flags += ["--max-pending-calls", str(args.max_pending_calls)]
    if args.overload_busy_share is not None:
        serve_flags += ["--overload-busy-share", str(args.overload_busy_share)]
    if args.max_streams_per_connection is not None:
        serve_flags += ["--max-streams-per-connection", str(args.max_streams_per_connection)]
    scenarios: list[H2Scenario] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        shim = build_shim(tmp)
        valkey = EmbeddedRedis(tmp / "valkey", port=free_port(), persistent=True)
        url = valkey.start()
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY)
        sidecars: list[Sidecar] = []
        try:
            main_ = start_sidecar(url, policy, env, serve_flags)
            sidecars.append(main_)
            if args.compare_fairness:
                # Fairness off, as before it existed; and every noisy check refused, for what a refusal costs.
                sidecars.append(start_sidecar(url, policy, env, [*serve_flags, "--overload-busy-share", "0"]))
                sidecars.append(start_sidecar(url, policy, env, [*serve_flags, "--overload-busy-share", "0.01"]))
            for sidecar in sidecars:
                wait_serving(sidecar.addr)
            assert valkey.pid is not None
            addr, metrics_port = main_.addr, main_.metrics_port

            def pids(sidecar: Sidecar) -> dict[str, int]:
                assert valkey.pid is not None
                return {"sidecar": sidecar.process.pid, "Valkey": valkey.pid}

            def closed(tag: str, seconds: float, at: str = addr) -> H2Run:
                return h2load_run(at, "noisy", tag, tmp, seconds=seconds, deadline=args.client_deadline,
                                  clients=2, streams=args.concurrency)  # fmt: skip

            for n, sidecar in enumerate(sidecars):
                h2load_scenario("warm-up", [closed(f"warm{n}", 1.0, sidecar.addr)], shim, sidecar.metrics_port,
                                pids(sidecar), 1.0)  # fmt: skip
            saturation = h2load_scenario(
                "closed loop (saturation)", [closed("sat", args.seconds)], shim, metrics_port, pids(main_), args.seconds
            )
            scenarios.append(saturation)
            sat_rate = saturation.decided("noisy") / saturation.seconds
            quiet_rate = max(1.0, args.quiet_share * sat_rate)

            def quiet(tag: str, at: str) -> H2Run:
                return h2load_run(at, "quiet", tag, tmp, seconds=args.seconds, deadline=args.client_deadline,
                                  clients=1, streams=max(64, int(quiet_rate * args.client_deadline * 2)),
                                  rps=quiet_rate)  # fmt: skip

            variants = [(main_, "")] + ([(sidecars[1], FAIRNESS_OFF)] if args.compare_fairness else [])
            if args.compare_fairness:
                # Saturated, not overloaded: a closed loop holds a bounded number of calls, so gRPC refuses none.
                for sidecar, suffix in variants:
                    tag = f"satq{'off' if suffix else ''}"
                    runs = [closed(tag, args.seconds, sidecar.addr), quiet(f"{tag}q", sidecar.addr)]
                    scenarios.append(
                        h2load_scenario(f"closed loop with the quiet tenant{suffix}", runs, shim, sidecar.metrics_port,
                                        pids(sidecar), args.seconds)
                    )  # fmt: skip
            for multiple in (float(m) for m in args.multiples.split(",")):
                # Streams enough for every check of the client deadline in flight: h2load never holds one back.
                streams = max(64, int(multiple * sat_rate * args.client_deadline * 2 / args.processes))
                for sidecar, suffix in variants:
                    tag = f"x{multiple:g}{'off' if suffix else ''}"
                    runs = [
                        h2load_run(sidecar.addr, "noisy", f"{tag}n", tmp, seconds=args.seconds,
                                   deadline=args.client_deadline, clients=args.processes, streams=streams,
                                   rps=multiple * sat_rate - quiet_rate),
                        quiet(f"{tag}q", sidecar.addr),
                    ]  # fmt: skip
                    scenarios.append(
                        h2load_scenario(f"open loop, {multiple:g}x saturation{suffix}", runs, shim,
                                        sidecar.metrics_port, pids(sidecar), args.seconds, sidecar.addr,
                                        args.probe_rate, args.client_deadline)
                    )  # fmt: skip
            if args.compare_fairness:
                refusing = sidecars[2]
                scenarios.append(
                    h2load_scenario(REFUSAL_SCENARIO, [closed("refused", args.seconds, refusing.addr),
                                    quiet("refusedq", refusing.addr)], shim, refusing.metrics_port, pids(refusing),
                                    args.seconds)
                )  # fmt: skip
            held = read_back(addr, len(TASK_MARK))
        finally:
            for sidecar in sidecars:
                sidecar.process.terminate()
                sidecar.process.wait(30)
            valkey.stop()
    lines = h2load_report(args, scenarios, held, sat_rate, quiet_rate, load_before)
    publish(lines, args.write)
    return 1 if any(used > limit for used, limit, _ in held.values()) else 0


def _ms(values: list[float], q: float) -> float:
    return percentile(values, q) / 1000 if values else float("nan")


def refusal_cost(scenarios: list[H2Scenario], sat_rate: float) -> list[str]:
    """What a check refused in the handler costs the sidecar's CPU, against one decided: from the closed loop in which
    every noisy check is refused, less the quiet tenant's decided checks at the saturation's cost each."""
    refusing = [s for s in scenarios if s.name == REFUSAL_SCENARIO]
    if not refusing:
        return []
    s, saturation = refusing[0], scenarios[0]
    per_decided = saturation.cpu["sidecar"] / sat_rate  # core-seconds per check
    decided = sum(s.decided(t) for t in ("noisy", "quiet")) / s.seconds
    shed = sum(s.shed(t) for t in ("noisy", "quiet")) / s.seconds
    per_refused = (s.cpu["sidecar"] - decided * per_decided) / max(shed, 1e-9)
    return [
        "",
        f"- What a refusal costs: closed loop against a sidecar that counts as overloaded whenever it has work "
        f"(--overload-busy-share 0.01), so every noisy check is refused in the handler (parse, decide, abort; no store "
        f"call): {shed:,.0f} refused/s and {decided:,.0f} decided/s (the quiet tenant) at {s.cpu['sidecar']:.0%} of a "
        f"core. At {per_decided * 1e6:,.0f} µs of sidecar CPU per decided check (the saturation row), a refused check "
        f"cost {per_refused * 1e6:,.0f} µs ({per_refused / per_decided:.0%} of a decided one); all of it in gRPC's "
        "and the handler's per-call work, which a refusal cannot skip.",
    ]


def h2load_report(args: argparse.Namespace, scenarios: list[H2Scenario], held: dict[str, tuple[int, int, int]],
                  sat_rate: float, quiet_rate: float, load_before: float) -> list[str]:  # fmt: skip
    command = " ".join(["bench/overload.py", *sys.argv[1:]])
    lines = [
        "### Overload under h2load: unary checks at 2x and 5x saturation, a noisy and a quiet tenant"
        + "".join(
            f", --{flag.replace('_', '-')} {value}"
            for flag in (
                "max_pending_calls",
                "max_checks_in_flight",
                "tenant_in_flight_share",
                "overload_busy_share",
                "max_streams_per_connection",
            )
            if (value := getattr(args, flag)) is not None
        )
        + f" ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python {command}` (one `budgetwarden serve` on its own Valkey "
        "with AOF everysec, its default bounds (--max-pending-calls, --max-checks-in-flight), tenant share and "
        "--overload-busy-share unless "
        "the command sets them, a Prometheus endpoint"
        + (
            "; with --compare-fairness two more sidecars on the same Valkey: one with fairness off "
            "(--overload-busy-share 0, as before it existed), which takes each open-loop scenario right after the "
            "first, and one that counts as overloaded whenever it has work (--overload-busy-share 0.01), for what a "
            "refusal costs"
            if args.compare_fairness
            else ""
        )
        + "; "
        f"generator: h2load 1.52 (`-t1 -H 'grpc-timeout: {args.client_deadline * 1000:g}m'`, bench/vary_body.c "
        f"preloaded so every check is a new step); saturation: `h2load -c2 -m{args.concurrency}` closed loop; open "
        f"loop: `h2load --rps` with {args.processes} connections for the noisy tenant and one h2load process, one "
        f"connection, for the quiet tenant at {args.quiet_share:.0%} of saturation, streams enough never to hold a "
        f"check back; {args.seconds:g} s per scenario; every check asks {TOKENS} tokens of one of {TASKS['noisy']} "
        f"(noisy) or {TASKS['quiet']} (quiet) tasks with a ceiling of {CEILING:,}; h2load, sidecar and Valkey share "
        "the 2 cores). h2load cannot read grpc-status, so outcomes are the sidecar's own counts over the scenario "
        "(budgetwarden_check_decisions_total, of which fail mode: reason FAIL_OPEN/FAIL_CLOSED, the store call missed "
        "the check deadline; budgetwarden_check_shed_total); no answer: what h2load sent less those (gRPC refused "
        "it at once with CANCELLED, --max-pending-calls; or its deadline passed first; or h2load stopped before the "
        "answer: the probe's table tells them apart); shed counts every reason (budgetwarden_reason: fair_share, "
        "deadline, in_flight, tenant_in_flight). Latency: h2load's per-request "
        "time of every response (decided, shed or deadline alike), from the request's start; the sidecar's own check "
        "duration (validation to decision, bucket upper bounds) beside it.",
        "",
        "| scenario | tenant | offered checks/s | sent | decided checks/s | of which fail mode | shed | no answer "
        "| h2load p50 ms | h2load p99 ms | h2load late p50 / p99 ms | sidecar check p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in scenarios:
        for run in s.runs:
            sent = len(run.latencies_us) + run.failed
            decided, shed, fail = s.decided(run.tenant), s.shed(run.tenant), s.fail_mode(run.tenant)
            late = late_us(run)
            lines.append(
                f"| {s.name} | {run.tenant} | {f'{run.offered:,.0f}' if run.offered else 'closed loop'} | {sent:,} | "
                f"{decided / s.seconds:,.0f} | {fail / max(1, sent):.1%} | {shed / max(1, sent):.1%} | "
                f"{max(0, sent - decided - shed) / max(1, sent):.1%} | {_ms(run.latencies_us, 0.5):.1f} | "
                f"{_ms(run.latencies_us, 0.99):.1f} | "
                + (f"{_ms(late, 0.5):.1f} / {_ms(late, 0.99):.1f}" if late else "")
                + f" | {duration_quantile(s.metrics, 0.5):g} / {duration_quantile(s.metrics, 0.99):g} |"
            )
    lines += [
        "",
        f"What a caller sees (the probe: {args.probe_rate:g} checks/s from gRPC's Python client in the benchmark's "
        "process, a third tenant, same deadline): the share of each outcome, and p50/p99 of the checks decided by "
        "the store, from when each was sent.",
        "",
        "| scenario | probe checks | decided p50 ms | decided p99 ms | outcomes |",
        "|---|---|---|---|---|",
    ]
    for s in scenarios:
        if s.probe is None:
            continue
        total = sum(s.probe.outcomes.values())
        shares = ", ".join(f"{name} {count / max(1, total):.0%}" for name, count in s.probe.outcomes.most_common())
        lines.append(
            f"| {s.name} | {total} | {_ms(s.probe.answered_us, 0.5):.1f} | {_ms(s.probe.answered_us, 0.99):.1f} | "
            f"{shares} |"
        )
    lines += [
        "",
        "CPU time over each scenario, as a share of one core:",
        "",
        "| scenario | sidecar | Valkey | h2load |",
        "|---|---|---|---|",
        *[f"| {s.name} | {s.cpu['sidecar']:.0%} | {s.cpu['Valkey']:.0%} | {s.cpu['h2load']:.0%} |" for s in scenarios],
    ]
    lines += refusal_cost(scenarios, sat_rate)
    over_held = {task: used for task, (used, limit, _) in held.items() if used > limit}
    limits = {limit for _, limit, _ in held.values()}
    at_ceiling = sum(1 for used, limit, _ in held.values() if used + TOKENS > limit)
    lines += [
        "",
        f"- Saturation: {sat_rate:,.0f} checks/s decided in closed loop; the quiet tenant offered {quiet_rate:,.0f}/s.",
        f"- The machine's 1-minute load average: {load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after "
        "(other work shares these 2 cores).",
        f"- Over-grant (read back from Redis; h2load cannot see what each check was granted): {len(held)} tasks "
        f"hold tokens; the most (used + reserved) is {max((u for u, _, _ in held.values()), default=0):,} against "
        f"ceilings of {sorted(limits)}; {len(over_held)} over the ceiling; {at_ceiling} at their ceiling.",
        "",
    ]
    return lines


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
    parser.add_argument("--max-pending-calls", type=int, default=None, help="h2load: (the sidecar's default)")
    parser.add_argument("--overload-busy-share", type=float, default=None, help="h2load: (the sidecar's default)")
    parser.add_argument(
        "--max-streams-per-connection", type=int, default=None,
        help="h2load: calls one connection may have open (the sidecar's default); h2load holds the rest back itself",
    )  # fmt: skip
    parser.add_argument(
        "--compare-fairness", action="store_true",
        help="h2load: each open-loop scenario also against a sidecar with fairness off, and a closed loop against one "
        "that refuses every noisy check (what a refusal costs); all on the same Valkey",
    )  # fmt: skip
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--probe-rate", type=float, default=20.0, help="h2load: checks/s of the Python probe")
    parser.add_argument(
        "--generator", choices=("h2load", "python"), default="h2load",
        help="h2load (C, far cheaper per check than the sidecar) or Python client processes",
    )  # fmt: skip
    args = parser.parse_args()
    if args.generator == "h2load":
        return h2load_main(args)
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
