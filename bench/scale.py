"""Cost per check vs. the number of active tasks: is it flat from 1 thousand to 1 million?

    .venv/bin/python bench/scale.py [--tasks 1000,1000000] [--seconds 10] [--write docs/benchmarks.md]
    .venv/bin/python bench/scale.py --smoke                                   (tiny N, a second per scenario)

One Valkey (append-only file, everysec, as in harness.py) and one `budgetwarden serve` against it. For each N, in
ascending order and in the same run, a tenant of its own (`scale-N`) gets N active tasks preloaded in-process through
the sidecar's own `Limiter.check_many` with the harness policy (so they are the tasks the sidecar then checks: task
hash + one live reservation each, leases long enough to outlast the run). After the preload
an AOF rewrite is run and waited for, so no rewrite (a fork on 2 cores) overlaps the measurement. Then closed-loop
Check load from harness.run_load, each check a new step of a task drawn uniformly at random from the N. Redis memory
is read before and after each preload (INFO used_memory) and per key kind with MEMORY USAGE.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from redis.asyncio import Redis as AsyncRedis

from budgetwarden.domain._model import CheckInput
from budgetwarden.domain._policy import parse_policy
from budgetwarden.limiter import Limiter
from budgetwarden.store._codec import reply_text
from budgetwarden.store._embedded import EmbeddedRedis, free_port
from budgetwarden.store._keys import TenantKeys
from budgetwarden.store._store import BudgetStore

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, publish, wait_serving  # noqa: E402
from harness import POLICY, Result, rss_mb, run_load, start  # noqa: E402

# The request shape of harness.py's load (800 input + 200 output tokens, default model and task type).
INPUT_TOKENS, OUTPUT_TOKENS = 800, 200
PRELOAD_LEASE_S = 4 * 3_600  # preloaded reservations stay live for the whole run
# Memory we allow Valkey to reach, as a share of MemAvailable at start (an AOF rewrite forks: copy-on-write headroom).
MEMORY_SHARE = 0.4
ASSUMED_BYTES_PER_TASK = 8192  # until the first N has been measured


def task_id(i: int) -> str:
    """harness.py names the tasks of its load `task-<i>`, i in [0, N)."""
    return f"task-{i}"


def preload_check(tenant: str, i: int, step: str = "preload") -> CheckInput:
    """The check that makes task i of `tenant` active: the load's request shape, with a lease that outlasts the run."""
    return CheckInput(
        tenant_id=tenant, task_id=task_id(i), step_id=step, task_type="", model="",
        input_tokens=INPUT_TOKENS, output_tokens=OUTPUT_TOKENS, tool_calls=0, lease_seconds=PRELOAD_LEASE_S,
    )  # fmt: skip


def limiter(client: AsyncRedis) -> Limiter:
    """A limiter like the sidecar's, with a deadline long enough for preloading (no fail-mode answers)."""
    loaded = parse_policy(POLICY, "bench")
    return Limiter(BudgetStore(client), lambda: loaded, check_deadline_s=60, store_deadline_s=60)


class ScriptSpy:
    """Stands in for a store's script object (``store._check = ScriptSpy(store._check)``): records the keys and
    arguments of the last call, then runs the real script with them."""

    def __init__(self, script: Any) -> None:
        self.script = script
        self.keys: list[str] = []
        self.args: list[str] = []

    def __call__(self, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        self.keys = [reply_text(k) for k in keys or ()]
        self.args = [reply_text(a) for a in args or ()]
        return self.script(keys=keys, args=args, client=client)


# --- preload (worker processes) ------------------------------------------------------------------------------------

PRELOAD_BATCH = 1000  # checks per Limiter.check_many call (it sends them in script calls of 100)
PRELOAD_IN_FLIGHT = 4  # calls in flight per process


async def _preload(job: dict[str, Any]) -> int:
    """Each task's first step is checked through the sidecar's own Limiter, many at a time."""
    client = AsyncRedis.from_url(job["url"])
    checks = limiter(client)
    starts = iter(range(job["first"], job["stop"], PRELOAD_BATCH))
    done = 0

    async def batches() -> None:
        nonlocal done
        for lo in starts:  # shared by the coroutines: each batch is taken once
            hi = min(lo + PRELOAD_BATCH, job["stop"])
            results = await checks.check_many([preload_check(job["tenant"], i) for i in range(lo, hi)])
            assert all(r.lease_expires_ms is not None for r in results), "a preload check was not reserved"
            done += len(results)

    try:
        await asyncio.gather(*(batches() for _ in range(PRELOAD_IN_FLIGHT)))
    finally:
        await client.aclose()
    return done


def _preload_worker(job: dict[str, Any]) -> int:
    return asyncio.run(_preload(job))


def preload(url: str, tenant: str, n: int, processes: int) -> int:
    """Check one step of each of tasks [0, n) of `tenant`, from `processes` processes; returns the live reservations
    of the tenant afterwards (each preloaded task holds exactly one)."""
    bounds = [n * p // processes for p in range(processes + 1)]
    jobs = [{"url": url, "tenant": tenant, "first": lo, "stop": hi} for lo, hi in itertools.pairwise(bounds) if hi > lo]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        sent = sum(pool.map(_preload_worker, jobs))
    assert sent == n, (sent, n)
    with redis.Redis.from_url(url) as client:
        return int(client.zcard(TenantKeys(tenant).leases))


# --- Redis introspection -------------------------------------------------------------------------------------------


def rewrite_aof(client: redis.Redis) -> float:
    """Compact the append-only file now and wait, so that no automatic rewrite runs during a measurement."""
    started = time.perf_counter()
    while client.info("persistence")["aof_rewrite_in_progress"]:
        time.sleep(0.1)
    client.bgrewriteaof()
    time.sleep(0.1)
    while True:
        info = client.info("persistence")
        if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            return time.perf_counter() - started
        time.sleep(0.1)


def evalsha_usec_per_call(client: redis.Redis) -> float:
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return float(stats.get("usec_per_call", float("nan")))


@dataclass
class KeySizes:
    task: int
    reservation: int
    leases_total: int
    leases_members: int
    windows: dict[str, int]

    @property
    def leases_share(self) -> float:
        return self.leases_total / max(1, self.leases_members)


def key_sizes(client: redis.Redis, url: str, tenant: str) -> KeySizes:
    """MEMORY USAGE of each kind of key of one preloaded task, found from the keys its check really uses."""

    async def spy_keys() -> list[str]:
        async_client = AsyncRedis.from_url(url)
        checks = limiter(async_client)
        spy = ScriptSpy(checks.store._check)
        checks.store._check = spy  # type: ignore[assignment]
        result = await checks.check(preload_check(tenant, 0))  # the preload's own step again: a replay
        await async_client.aclose()
        assert result.replayed, result.verdict
        return spy.keys

    keys = asyncio.run(spy_keys())

    def usage(key: str) -> int:
        return int(client.memory_usage(key, samples=0) or 0)

    def one(marker: str) -> str:
        found = [k for k in keys if marker in k]
        assert len(found) == 1, (marker, keys)
        return found[0]

    leases = next(k for k in keys if k.endswith(":leases"))
    return KeySizes(
        task=usage(one(":task:")),
        reservation=usage(one(":resv:")),
        leases_total=usage(leases),
        leases_members=int(client.zcard(leases)),
        windows={k.split(":win:", 1)[1]: usage(k) for k in keys if ":win:" in k},
    )


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# --- the run -------------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    tasks: int
    label: str
    preload_s: float | None
    rewrite_s: float
    bytes_per_task: float | None
    usec_per_check: float
    load_avg: float
    result: Result


def parse_counts(text: str) -> list[int]:
    return sorted({int(part.replace("_", "")) for part in text.split(",") if part.strip()})


def measure(addr: str, client: redis.Redis, n: int, seconds: float, processes: int) -> tuple[Result, float, float]:
    """Closed-loop checks of tenant scale-N, each a new step of one of its N tasks drawn uniformly; with the server-side
    time per EVALSHA and the 1-minute load average at the end (the machine is shared)."""
    tenant = f"scale-{n}"
    print(f"measuring {n:,} tasks ...", file=sys.stderr, flush=True)
    tasks = n  # harness picks each check's task uniformly at random among them
    run_load("warm-up", "budgetwarden", addr, mode="closed", seconds=min(1.0, seconds), processes=1, tasks=tasks,
             tenant=tenant)  # fmt: skip
    client.config_resetstat()
    result = run_load(f"closed loop, {n:,} active tasks", "budgetwarden", addr, mode="closed", seconds=seconds,
                      processes=processes, tasks=tasks, tenant=tenant)  # fmt: skip
    return result, evalsha_usec_per_call(client), os.getloadavg()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=parse_counts, default=[1000, 1_000_000], help="e.g. 1000,1000000")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--processes", type=int, default=2, help="load generator processes (and preload processes)")
    parser.add_argument("--no-aof", action="store_true", help="run Valkey without its append-only file")
    parser.add_argument("--smoke", action="store_true", help="tiny N, a second per measurement, nothing written")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    counts = [100, 1000] if args.smoke else args.tasks
    seconds = 1.0 if args.smoke else args.seconds
    processes = 1 if args.smoke else args.processes
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | {"OTEL_SDK_DISABLED": "true"}
    phases: list[Phase] = []
    sizes: KeySizes | None = None
    notes: list[str] = []
    budget = int(mem_available() * MEMORY_SHARE)

    with tempfile.TemporaryDirectory() as tmp:
        valkey = EmbeddedRedis(Path(tmp) / "valkey", port=free_port(), persistent=not args.no_aof)
        url = valkey.start()
        client = redis.Redis.from_url(url)
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        addr = f"127.0.0.1:{free_port()}"
        sidecar = start(
            ["-m", "budgetwarden", "serve", "--listen", addr, "--redis-url", url, "--policy-file", str(policy),
             "--log-level", "WARNING", "--usage-stream-max-len", "10000000"], env,
        )  # fmt: skip
        try:
            wait_serving(addr)
            per_task = float(ASSUMED_BYTES_PER_TASK)
            for n in counts:
                used = int(client.info("memory")["used_memory"])
                if used + per_task * n > budget:
                    fitting = int((budget - used) / per_task) // 1000 * 1000
                    notes.append(
                        f"{n:,} tasks do not fit comfortably ({per_task:,.0f} bytes per task, {budget / 2**30:.1f} GiB "
                        f"allowed = {MEMORY_SHARE:.0%} of MemAvailable at start): measured {fitting:,} instead"
                    )
                    n = fitting
                    if n <= 0:
                        break
                tenant = f"scale-{n}"
                print(f"preloading {n:,} active tasks of tenant {tenant} ...", file=sys.stderr, flush=True)
                started = time.perf_counter()
                live = preload(url, tenant, n, processes)
                preload_s = time.perf_counter() - started
                if live != n:
                    raise RuntimeError(f"after the preload {tenant} holds {live:,} live reservations, not {n:,}")
                rewrite_s = rewrite_aof(client) if not args.no_aof else 0.0
                per_task = (int(client.info("memory")["used_memory"]) - used) / n
                sizes = key_sizes(client, url, tenant)
                result, usec, load = measure(addr, client, n, seconds, processes)
                phases.append(Phase(n, f"{n:,}", preload_s, rewrite_s, per_task, usec, load, result))
            if len(phases) >= 2:  # the first N again, now beside the largest: brackets the drift of a shared machine
                n = phases[0].tasks
                result, usec, load = measure(addr, client, n, seconds, processes)
                phases.append(Phase(n, f"{n:,} again, at the end", None, 0.0, None, usec, load, result))
            memory = client.info("memory")
            keys = client.dbsize()
            sidecar_rss = rss_mb(sidecar.pid)
            aof = sum(f.stat().st_size for f in (Path(tmp) / "valkey").rglob("*.aof"))
        finally:
            sidecar.terminate()
            sidecar.wait(30)
            client.close()
            valkey.stop()

    persistence = "without AOF (--no-aof)" if args.no_aof else "with AOF everysec (rewritten after each preload)"
    measured = [p for p in phases if p.preload_s is not None]
    counted = ",".join(str(p.tasks) for p in measured)
    command = f".venv/bin/python bench/scale.py --tasks {counted} --seconds {seconds:g}"
    if args.no_aof:
        command += " --no-aof"
    lines = [
        f"### Cost per check vs. active tasks ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Command: `{command}` ({processes} load-generator processes of grpc.aio clients, 16 in "
        "flight each, closed loop; each check a new step of a task drawn uniformly from the N active ones; Valkey "
        f"{persistence}; sidecar, Valkey and load on the same cores; metrics off). Active task: a task hash and one "
        "live reservation, preloaded in-process through `Limiter.check_many`, in a tenant of its own.",
        "",
        "| active tasks | preload s (tasks/s) | Redis bytes per active task | checks/s | p50 ms | p90 ms | p99 ms "
        "| p99.9 ms | max ms | Redis µs per check | load avg | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        r = p.result
        preloaded = "" if p.preload_s is None else f"{p.preload_s:.1f} ({p.tasks / p.preload_s:,.0f})"
        per_task = "" if p.bytes_per_task is None else f"{p.bytes_per_task:,.0f}"
        lines.append(
            f"| {p.label} | {preloaded} | {per_task} | {r.rate:,.0f} | {r.p50:.2f} | {r.p90:.2f} | {r.p99:.2f} | "
            f"{r.p999:.2f} | {r.max:.2f} | {p.usec_per_check:.1f} | {p.load_avg:.1f} | {r.errors} |"
        )
    if len(measured) >= 2:
        lo, hi = measured[0], measured[-1]
        lines += [
            "",
            f"Ratios, {hi.tasks:,} vs. {lo.tasks:,} active tasks, same run: checks/s "
            f"{hi.result.rate / lo.result.rate:.2f}, p50 {hi.result.p50 / lo.result.p50:.2f}, p99 "
            f"{hi.result.p99 / lo.result.p99:.2f}, Redis time per check {hi.usec_per_check / lo.usec_per_check:.2f}. "
            "Redis µs per check: EVALSHA usec_per_call from INFO commandstats over the measurement (wall time inside "
            "the server, so it grows when the server shares its core). Load avg: 1-minute load average at the end of "
            "the measurement (2 cores; other work on the machine shows here).",
        ]
    if sizes is not None and measured:
        last = measured[-1]
        assert last.bytes_per_task is not None
        listed = sizes.task + sizes.reservation + sizes.leases_share
        lines += [
            "",
            f"Redis memory per key kind (MEMORY USAGE, one task of the {last.tasks:,}-task tenant):",
            "",
            "| key | bytes | per active task |",
            "|---|---|---|",
            f"| task hash (`…:task:<digest>`) | {sizes.task:,} | {sizes.task:,} |",
            f"| reservation record (`…:resv:<id>`) | {sizes.reservation:,} | {sizes.reservation:,} |",
            f"| leases sorted set (`…:leases`, {sizes.leases_members:,} members) | {sizes.leases_total:,} | "
            f"{sizes.leases_share:,.0f} |",
            *[
                f"| window `win:{window}` (one per tenant) | {size:,} | {size / last.tasks:.2f} |"
                for window, size in sizes.windows.items()
            ],
            f"| sum of the above | | {listed:,.0f} |",
            f"| INFO used_memory growth over the preload / tasks | | {last.bytes_per_task:,.0f} |",
        ]
    notes += [
        f"Valkey at the end: {keys:,} keys, used_memory {memory['used_memory'] / 2**20:,.0f} MiB (peak "
        f"{memory['used_memory_peak'] / 2**20:,.0f} MiB), RSS {memory['used_memory_rss'] / 2**20:,.0f} MiB, "
        f"allocator {memory.get('mem_allocator', '?')}; append-only file {aof / 2**20:,.0f} MiB; sidecar RSS "
        f"{sidecar_rss:.0f} MB",
        *[
            f"{p.tasks:,} tasks: the AOF rewrite after the preload took {p.rewrite_s:.1f} s (before the measurement)"
            for p in measured
            if p.rewrite_s
        ],
    ]
    lines += ["", *[f"- {note}" for note in notes], ""]
    publish(lines, None if args.smoke else args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
