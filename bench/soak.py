"""The soak: an hour (or --minutes) of mixed load against one `budgetwarden serve`; does anything keep growing?

    .venv/bin/python bench/soak.py [--minutes 60] [--sample-seconds 60] [--rate 100] [--write docs/benchmarks.md]

`budgetwarden serve` runs as a child process on its embedded Valkey (its default: a unix socket and an append-only
file, fsynced always, in a temporary data dir). Workers in this process (grpc.aio) offer `--rate` steps a second,
paced (open loop with a bounded number of workers), across `--tenants` tenants and a pool of `--active-tasks` tasks.
A step is a Check; an admitted step is then reported (70%), released (15%), or left to lapse (15%: its lease
expires). Each task runs a random number of steps and is then replaced by a new task id, so old tasks go idle and
their keys must expire: thousands of tasks over a run. One task type stops its tasks at a checkpoint; some tenants
have tight minute windows (DENY). Every `--reload-seconds` the policy file the sidecar watches is rewritten (the
tight tenants' minute limits and the task ceilings alternate), and the answers' policy versions show it was applied.

Every `--sample-seconds` it samples the sidecar's RSS and open fds (/proc/PID), Valkey's used_memory and DBSIZE (and
the keys per kind), the checks' p99 latency over the interval, and the errors. At the end: least-squares slopes over
the second half of the run, per hour, and whether memory and keys level off.

Retention is shortened so that expiry shows within minutes (see RETENTION_FLAGS and POLICY): leases of 10 s, a
reservation record kept 60 s after its lease, an idle task 120 s, idempotency keys 60 s + the longest lease (60 s),
window counters 60 s after their window, usage streams capped at 1,000 entries per tenant and 120 s of age, and
notification streams (nothing delivers them here: no control plane runs) at 10 entries per tenant. So every key a
step writes is gone within about 3 minutes of the step, and each per-tenant stream stops at its cap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
import redis.asyncio as aioredis

from budgetwarden.store._embedded import free_port
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_api.v1 import budget_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, percentile, publish, wait_serving  # noqa: E402

LEASE_S = 10
RETENTION_FLAGS = [
    "--max-lease-seconds", "60",
    "--reservation-retention-seconds", "60",
    "--task-retention-seconds", "120",
    "--idempotency-window-seconds", "60",
    "--window-grace-seconds", "60",
    "--usage-stream-max-len", "1000",
    "--usage-stream-max-age-seconds", "120",
    "--notify-stream-max-len", "10",
    "--notify-stream-max-age-seconds", "120",
]  # fmt: skip
TIGHT_EVERY = 5  # every 5th tenant has a tight minute window


def tenant_name(i: int) -> str:
    return f"soak-tight-{i}" if i % TIGHT_EVERY == 0 else f"soak-{i}"


def full_policy(generation: int, tenants: int) -> str:
    """The policy of reload `generation`: the tight tenants' minute limit and the task ceilings alternate."""
    odd = generation % 2
    tight_minute = 100_000 if odd else 150_000
    agent_ceiling = 30_000 if odd else 40_000
    tight = "\n".join(
        f"  {tenant_name(i)}: {{windows: {{minute: {{tokens: {tight_minute}}}, hour: {{tokens: 10000000000}}}}}}"
        for i in range(0, tenants, TIGHT_EVERY)
    )
    return f"""# soak policy, generation {generation}
version: 1
min_lease_seconds: 5
default_tenant: {{windows: {{minute: {{tokens: 100000000}}, hour: {{tokens: 10000000000}}}}}}
tenants:
{tight}
models:
  big: {{input_usd_per_mtok: 2.5, output_usd_per_mtok: 10, degrade_to: small}}
  small: {{input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.6}}
default_task_type: agent
task_types:
  agent:
    per_task: {{tokens: {agent_ceiling}}}
    per_step: {{tokens: 8000}}
    soft_threshold: 0.8
    degrade:
      - {{name: cheaper-model, model: cheaper}}
      - {{name: smaller-output, max_output_tokens: 200}}
  review:
    per_task: {{tokens: 12000}}
    per_step: {{tokens: 8000}}
    checkpoint_threshold: 0.8
"""


# --- the load ------------------------------------------------------------------------------------------------------


@dataclass
class Interval:
    """What happened since the last sample."""

    latencies_ms: list[float] = field(default_factory=list)
    steps: int = 0
    errors: int = 0
    fail_mode: int = 0
    decisions: dict[str, int] = field(default_factory=dict)
    reports: int = 0
    releases: int = 0
    lapses: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


@dataclass
class TaskSlot:
    tenant: str
    task_id: str
    task_type: str
    steps_left: int
    step: int = 0


class Load:
    def __init__(self, stub: pb_grpc.BudgetServiceAsyncStub, tenants: int, active_tasks: int, seed: int) -> None:
        self.stub = stub
        self.tenants = tenants
        self.random = random.Random(seed)
        self.created = 0
        self.slots = [self._new_task() for _ in range(active_tasks)]
        self.now = Interval()
        self.total = Interval()
        self.policy_versions: set[str] = set()

    def _new_task(self) -> TaskSlot:
        self.created += 1
        kind = "review" if self.random.random() < 0.2 else "agent"
        tenant = tenant_name(self.random.randrange(self.tenants))
        return TaskSlot(tenant, f"t{self.created}", kind, steps_left=self.random.randint(3, 40))

    def take(self) -> tuple[TaskSlot, int]:
        """A task of the pool and its next step number; a task that has run its steps is replaced (goes idle)."""
        index = self.random.randrange(len(self.slots))
        slot = self.slots[index]
        slot.step += 1
        slot.steps_left -= 1
        if slot.steps_left <= 0:
            self.slots[index] = self._new_task()
        return slot, slot.step

    def count(self, name: str, n: int = 1) -> None:
        for interval in (self.now, self.total):
            setattr(interval, name, getattr(interval, name) + n)

    def error(self, kind: str) -> None:
        self.now.error(kind)
        self.total.error(kind)

    async def step(self, timeout_s: float) -> None:
        slot, number = self.take()
        step_id = f"s{number}"
        model = "big" if self.random.random() < 0.7 else "small"
        request = pb.CheckRequest(
            tenant_id=slot.tenant, task_id=slot.task_id, step_id=step_id, task_type=slot.task_type, model=model,
            estimated_input_tokens=self.random.randint(200, 2000), max_output_tokens=self.random.randint(100, 800),
            lease_seconds=LEASE_S,
        )  # fmt: skip
        started = time.perf_counter()
        try:
            answer = await self.stub.Check(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            self.error(f"Check {e.code().name}")
            return
        self.now.latencies_ms.append((time.perf_counter() - started) * 1000)
        self.count("steps")
        if answer.from_fail_mode:
            self.count("fail_mode")
            return
        self.policy_versions.add(answer.policy_version)
        name = pb.Decision.Name(answer.decision).removeprefix("DECISION_").lower()
        for interval in (self.now, self.total):
            interval.decisions[name] = interval.decisions.get(name, 0) + 1
        if not answer.reservation_id or answer.granted_tokens <= 0:
            return
        fate = self.random.random()
        if fate < 0.70:
            await self.report(slot, step_id, answer, model, timeout_s)
        elif fate < 0.85:
            await self.release(slot, step_id, answer, timeout_s)
        else:
            self.count("lapses")  # the lease runs out; the sweep frees what it held

    async def report(
        self, slot: TaskSlot, step_id: str, answer: pb.CheckResponse, model: str, timeout_s: float
    ) -> None:
        granted = answer.granted_tokens
        used_in = self.random.randint(0, granted // 2)
        record = pb.UsageRecord(
            tenant_id=slot.tenant, reservation_id=answer.reservation_id, task_id=slot.task_id, step_id=step_id,
            model=answer.advice.model or model, input_tokens=used_in,
            output_tokens=self.random.randint(0, granted - used_in), outcome=pb.OUTCOME_COMPLETED,
            idempotency_key=f"{slot.tenant}/{slot.task_id}/{step_id}",
        )  # fmt: skip
        try:
            done = await self.stub.Report(pb.ReportRequest(records=[record]), timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            self.error(f"Report {e.code().name}")
            return
        status = done.results[0].status
        if status != pb.REPORT_STATUS_APPLIED:
            self.error(f"Report {pb.ReportStatus.Name(status)}")
            return
        self.count("reports")

    async def release(self, slot: TaskSlot, step_id: str, answer: pb.CheckResponse, timeout_s: float) -> None:
        request = pb.ReleaseRequest(
            tenant_id=slot.tenant, reservation_id=answer.reservation_id, task_id=slot.task_id, step_id=step_id
        )
        try:
            done = await self.stub.Release(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            self.error(f"Release {e.code().name}")
            return
        if done.status != pb.RELEASE_STATUS_RELEASED:
            self.error(f"Release {pb.ReleaseStatus.Name(done.status)}")
            return
        self.count("releases")


async def paced_workers(load: Load, rate: float, workers: int, until: float, timeout_s: float) -> None:
    """Steps at `rate` a second from `workers` coroutines: each takes the next slot of a shared schedule. A worker that
    falls behind does not make up for it in a burst (the schedule restarts from now after a second's lag)."""
    interval = 1.0 / rate
    next_at = time.perf_counter()

    async def worker() -> None:
        nonlocal next_at
        while True:
            now = time.perf_counter()
            if next_at < now - 1.0:
                next_at = now
            at, next_at = next_at, next_at + interval
            if at >= until:
                return
            if at > now:
                await asyncio.sleep(at - now)
            await load.step(timeout_s)

    await asyncio.gather(*(worker() for _ in range(workers)))


# --- sampling ------------------------------------------------------------------------------------------------------


KEY_KINDS = ("task", "resv", "idem", "win", "usage", "notify", "ckpt", "leases")
# The keys that hold many members (a sorted set or stream per tenant): their growth is not seen in DBSIZE.
COLLECTIONS = {"leases": "zcard", "ckpt:open": "zcard", "ckpt:decided": "zcard", "usage": "xlen", "notify": "xlen"}


@dataclass
class Sample:
    at_s: float
    rss_mb: float
    fds: int
    redis_mb: float
    keys: int
    kinds: dict[str, int]
    members: dict[str, int]
    steps: int
    p99_ms: float
    errors: int
    fail_mode: int
    tasks_created: int


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def key_kind(key: bytes) -> str:
    """`bw1:{tenant}:task:<digest>` -> task; the kinds of docs/storage.md's key table."""
    rest = key.decode(errors="replace").split("}:", 1)[-1]
    if rest in COLLECTIONS:
        return rest
    kind = rest.split(":", 1)[0]
    if kind in COLLECTIONS:  # a key beside a collection, such as `notify:dropped` (a string)
        return rest
    return kind if kind in KEY_KINDS else "other"


async def key_kinds(client: aioredis.Redis) -> tuple[dict[str, int], dict[str, int]]:
    """Keys per kind, and the members of the collection keys (sorted sets and streams) per kind."""
    kinds: dict[str, int] = {}
    collections: list[tuple[str, bytes]] = []
    async for key in client.scan_iter(count=1000):
        kind = key_kind(key)
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind in COLLECTIONS:
            collections.append((kind, key))
    pipe = client.pipeline(transaction=False)
    for kind, key in collections:
        getattr(pipe, COLLECTIONS[kind])(key)
    members = dict.fromkeys(COLLECTIONS, 0)
    for (kind, _), n in zip(collections, await pipe.execute(), strict=True):
        members[kind] += int(n)
    return kinds, members


async def sample(load: Load, client: aioredis.Redis, pid: int, started: float) -> Sample:
    interval, load.now = load.now, Interval()
    memory = await client.info("memory")
    kinds, members = await key_kinds(client)
    return Sample(
        at_s=time.perf_counter() - started,
        rss_mb=rss_mb(pid),
        fds=open_fds(pid),
        redis_mb=int(memory["used_memory"]) / 2**20,
        keys=int(await client.dbsize()),
        kinds=kinds,
        members=members,
        steps=interval.steps,
        p99_ms=percentile(interval.latencies_ms, 0.99) if interval.latencies_ms else float("nan"),
        errors=interval.errors,
        fail_mode=interval.fail_mode,
        tasks_created=load.created,
    )


async def reload_policy(path: Path, tenants: int, every_s: float, until: float) -> int:
    """Rewrites the policy file every `every_s` (written beside it and renamed in, as a config map update does)."""
    generation = 0
    while time.perf_counter() + every_s < until:
        await asyncio.sleep(every_s)
        generation += 1
        staged = path.with_suffix(".new")
        staged.write_text(full_policy(generation, tenants))
        staged.replace(path)
    return generation


# --- slopes --------------------------------------------------------------------------------------------------------


def slope_per_hour(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope of (seconds, value) points, per hour, and its standard error."""
    pairs = [(x / 3600, y) for x, y in points if y == y]  # NaN-free
    n = len(pairs)
    mx = sum(x for x, _ in pairs) / max(n, 1)
    my = sum(y for _, y in pairs) / max(n, 1)
    den = sum((x - mx) ** 2 for x, _ in pairs)
    if n < 3 or not den:
        return float("nan"), float("nan")
    slope = sum((x - mx) * (y - my) for x, y in pairs) / den
    residuals = sum((y - my - slope * (x - mx)) ** 2 for x, y in pairs)
    return slope, math.sqrt(residuals / (n - 2) / den)


# A quantity levels off when the second half's slope, projected over an hour, adds less than this share of its mean,
# or when no such growth is told apart from the noise: the slope less two standard errors stays under that share. (On
# a shared machine the load's throughput swings from minute to minute, and the keys and memory with it.)
FLAT_SHARE = 0.05
SLOPED: list[tuple[str, Callable[[Sample], float]]] = [
    ("sidecar RSS MB", lambda s: s.rss_mb),
    ("sidecar open fds", lambda s: s.fds),
    ("Valkey used_memory MiB", lambda s: s.redis_mb),
    ("Valkey keys", lambda s: s.keys),
    *[(f"members of `{kind}` (all tenants)", lambda s, kind=kind: s.members.get(kind, 0)) for kind in COLLECTIONS],
    ("check p99 ms", lambda s: s.p99_ms),
]


@dataclass
class Trend:
    label: str
    first: float
    second_mean: float
    last: float
    per_hour: float
    standard_error: float

    @property
    def flat(self) -> bool:
        # Falling is levelling off too; a quantity near zero gets a floor of one unit.
        return self.per_hour - 2 * self.standard_error <= FLAT_SHARE * max(abs(self.second_mean), 1.0)


def trends(samples: list[Sample]) -> list[Trend]:
    second = samples[len(samples) // 2 :]
    out = []
    for label, value in SLOPED:
        points = [(s.at_s, float(value(s))) for s in second]
        values = [y for _, y in points if y == y]
        mean = sum(values) / len(values) if values else float("nan")
        slope, error = slope_per_hour(points)
        out.append(Trend(label, float(value(samples[0])), mean, float(value(samples[-1])), slope, error))
    return out


# --- the run -------------------------------------------------------------------------------------------------------


@dataclass
class Sidecar:
    process: subprocess.Popen[bytes]
    addr: str
    policy: Path
    redis_socket: Path
    log: Path


def start_sidecar(args: argparse.Namespace, tmp: Path) -> Sidecar:
    """`budgetwarden serve` on its embedded Valkey in a data dir of its own, with the soak's policy and retention."""
    policy = tmp / "policy.yaml"
    policy.write_text(full_policy(0, args.tenants))
    data_dir = tmp / "data"
    addr = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "BUDGETWARDEN_"))}
    env["OTEL_SDK_DISABLED"] = "true"
    command = [
        sys.executable, "-m", "budgetwarden", "serve", "--listen", addr, "--data-dir", str(data_dir),
        "--policy-file", str(policy), "--policy-reload-seconds", "1", "--log-level", "WARNING",
        "--check-deadline-ms", str(args.check_deadline_ms), "--store-deadline-ms", str(args.store_deadline_ms),
        *RETENTION_FLAGS,
    ]  # fmt: skip
    log = tmp / "sidecar.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=out)
    return Sidecar(process, addr, policy, data_dir / "redis.sock", log)


def stop_sidecar(sidecar: Sidecar) -> None:
    sidecar.process.send_signal(signal.SIGTERM)
    try:
        sidecar.process.wait(30)
    except subprocess.TimeoutExpired:
        sidecar.process.kill()
        sidecar.process.wait(30)


def progress(latest: Sample) -> str:
    return (
        f"{elapsed(latest.at_s)}: RSS {latest.rss_mb:.1f} MB, fds {latest.fds}, Valkey {latest.redis_mb:.1f} MiB, "
        f"{latest.keys:,} keys, members {latest.members}, p99 {latest.p99_ms:.1f} ms, {latest.steps:,} steps, "
        f"errors {latest.errors}, fail mode {latest.fail_mode}"
    )


async def soak(args: argparse.Namespace, sidecar: Sidecar) -> tuple[list[Sample], Load, int, dict[str, float]]:
    """The load, the policy rewrites and the samples, until `args.minutes` have passed."""
    samples: list[Sample] = []
    pid = sidecar.process.pid
    await asyncio.to_thread(wait_serving, sidecar.addr, 60.0)
    client = aioredis.Redis(unix_socket_path=str(sidecar.redis_socket))
    async with grpc.aio.insecure_channel(sidecar.addr) as channel:
        load = Load(pb_grpc.BudgetServiceStub(channel), args.tenants, args.active_tasks, args.seed)
        started = time.perf_counter()
        until = started + args.minutes * 60
        samples.append(await sample(load, client, pid, started))
        driving = asyncio.gather(
            paced_workers(load, args.rate, args.workers, until, args.rpc_timeout),
            reload_policy(sidecar.policy, args.tenants, args.reload_seconds, until),
        )
        while not driving.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(driving), timeout=args.sample_seconds)
            if sidecar.process.poll() is not None:
                raise RuntimeError(f"the sidecar exited with {sidecar.process.returncode}; see {sidecar.log}")
            samples.append(await sample(load, client, pid, started))
            print(progress(samples[-1]), file=sys.stderr, flush=True)
        _, reloads = driving.result()
        info = await client.info("memory")
        extra = {
            "used_memory_peak_mb": int(info["used_memory_peak"]) / 2**20,
            "used_memory_rss_mb": int(info["used_memory_rss"]) / 2**20,
        }
        await client.aclose()
    return samples, load, reloads, extra


def elapsed(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def condensed(samples: list[Sample], rows: int) -> list[Sample]:
    """At most about `rows` samples, evenly spread, always with the first and the last."""
    step = max(1, round(len(samples) / rows))
    picked = samples[::step]
    return picked if picked[-1] is samples[-1] else [*picked, samples[-1]]


def report(
    args: argparse.Namespace, samples: list[Sample], load: Load, reloads: int, extra: dict[str, float]
) -> list[str]:
    command = (
        f".venv/bin/python bench/soak.py --minutes {args.minutes:g} --sample-seconds {args.sample_seconds:g} "
        f"--rate {args.rate:g} --tenants {args.tenants} --active-tasks {args.active_tasks}"
    )
    total = load.total
    decisions = ", ".join(f"{name} {n:,}" for name, n in sorted(total.decisions.items()))
    kinds = sorted({kind for s in samples for kind in s.kinds} - set(COLLECTIONS))
    lines = [
        f"### Soak: memory, fds and keys over {args.minutes:g} minutes of mixed load "
        f"({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}; **shared** with other work (other helpers' builds and test runs), so latency and "
        f"errors reflect that. Command: `{command}`. One `budgetwarden serve` (embedded Valkey: append-only file, "
        f"fsync always; metrics off; check deadline {args.check_deadline_ms} ms, store deadline "
        f"{args.store_deadline_ms} ms) and the load (one process, grpc.aio, {args.workers} paced workers offering "
        f"{args.rate:g} steps/s) on the same cores. {args.tenants} tenants (every {TIGHT_EVERY}th with a tight minute "
        f"window), a pool of {args.active_tasks:,} active tasks, each running 3-40 steps and then replaced by a new "
        f"one: {load.created:,} tasks in all. A step is a Check (lease {LEASE_S} s); an admitted step is then reported "
        "(70%), released (15%) or left to lapse (15%). 20% of the tasks are of a task type that stops at a checkpoint. "
        f"The policy file was rewritten {reloads} times (every {args.reload_seconds:g} s); the answers carried "
        f"{len(load.policy_versions)} distinct policy versions.",
        "",
        "Retention shortened so expiry shows within minutes: `" + " ".join(RETENTION_FLAGS) + "`, policy "
        "`min_lease_seconds: 5`, windows minute and hour. Every key a step writes expires within about 3 minutes.",
        "",
        f"Totals: {total.steps:,} checks ({decisions}); {total.reports:,} reports, {total.releases:,} releases, "
        f"{total.lapses:,} lapsed leases; {total.errors:,} errors"
        + (f" ({', '.join(f'{k} {n}' for k, n in sorted(total.error_kinds.items()))})" if total.errors else "")
        + f"; {total.fail_mode:,} fail-mode answers (the store missed the check deadline).",
        "",
        "Keys per kind (`task`, `resv`, ...: the key table of docs/storage.md) and members of the per-tenant sorted "
        "sets and streams (summed over the tenants):",
        "",
        "| elapsed | sidecar RSS MB | open fds | Valkey used_memory MiB | keys | "
        + " | ".join(f"`{k}` keys" for k in kinds)
        + " | "
        + " | ".join(f"`{k}` members" for k in COLLECTIONS)
        + " | checks in interval | check p99 ms | errors | fail-mode answers | tasks so far |",
        "|---|---|---|---|---|" + "---|" * (len(kinds) + len(COLLECTIONS)) + "---|---|---|---|---|",
    ]
    for s in condensed(samples, args.table_rows):
        lines.append(
            f"| {elapsed(s.at_s)} | {s.rss_mb:.1f} | {s.fds} | {s.redis_mb:.1f} | {s.keys:,} | "
            + " | ".join(f"{s.kinds.get(k, 0):,}" for k in kinds)
            + " | "
            + " | ".join(f"{s.members.get(k, 0):,}" for k in COLLECTIONS)
            + f" | {s.steps:,} | {s.p99_ms:.1f} | {s.errors} | {s.fail_mode} | {s.tasks_created:,} |"
        )
    lines += [
        "",
        f"Slopes: least squares over the second half of the run ({len(samples[len(samples) // 2 :])} samples, from "
        f"{elapsed(samples[len(samples) // 2].at_s)}), per hour. Levels off: the slope adds less than "
        f"{FLAT_SHARE:.0%} of the second half's mean per hour, or the slope less two standard errors does (growth not "
        "told apart from the minute-to-minute noise of a shared machine).",
        "",
        "| quantity | first sample | second-half mean | last sample | slope per hour (± 2 standard errors) "
        "| levels off |",
        "|---|---|---|---|---|---|",
    ]
    for t in trends(samples):
        lines.append(
            f"| {t.label} | {t.first:,.1f} | {t.second_mean:,.1f} | {t.last:,.1f} | {t.per_hour:+,.1f} "
            f"(± {2 * t.standard_error:,.1f}) | {'yes' if t.flat else 'NO'} |"
        )
    lines += [
        "",
        f"- Valkey at the end: used_memory peak {extra['used_memory_peak_mb']:.1f} MiB, RSS "
        f"{extra['used_memory_rss_mb']:.1f} MiB. Samples every {args.sample_seconds:g} s; the table shows "
        f"{len(condensed(samples, args.table_rows))} of {len(samples)}.",
        "",
    ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="how long the load runs")
    parser.add_argument("--sample-seconds", type=float, default=60.0, help="time between samples")
    parser.add_argument("--rate", type=float, default=50.0, help="steps offered per second")
    parser.add_argument("--workers", type=int, default=32, help="concurrent workers (bounds steps in flight)")
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--active-tasks", type=int, default=500, help="tasks in the pool at any time")
    parser.add_argument("--reload-seconds", type=float, default=30.0, help="time between policy rewrites")
    parser.add_argument("--check-deadline-ms", type=int, default=250, help="the sidecar's (its default: 250)")
    parser.add_argument("--store-deadline-ms", type=int, default=1000, help="the sidecar's (its default: 1000)")
    parser.add_argument("--rpc-timeout", type=float, default=10.0, help="client deadline of each call, seconds")
    parser.add_argument("--table-rows", type=int, default=16, help="samples shown in the written table")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    # A SIGTERM (kill) stops the run through the same clean-up as the end of it: the sidecar is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        sidecar = start_sidecar(args, Path(tmp))
        try:
            samples, load, reloads, extra = asyncio.run(soak(args, sidecar))
        finally:
            stop_sidecar(sidecar)
    publish(report(args, samples, load, reloads, extra), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
