"""Redis alone: how many checks per second the check script does under redis-benchmark, with no sidecar at all.

    .venv/bin/python bench/redis_baseline.py [--requests 200000] [--write docs/benchmarks.md]
    .venv/bin/python bench/redis_baseline.py --smoke

Needs `redis-benchmark` on PATH (Debian: `apt-get install redis-tools`); without it the baseline is skipped, and the
script says so and exits 0. One Valkey with bench's usual settings (append-only file, everysec). The check script is
loaded with SCRIPT LOAD, and one realistic EVALSHA command line is recorded from a real check through the sidecar's
own Limiter (with the harness policy) by a spy around the store's script object, so the keys and arguments are
exactly what the store sends, whatever their layout. In that command line the step id and the
reservation id are replaced by redis-benchmark's `__rand_int__`, so that every call is a new step of one task (a
replay only when two random ids collide; the key space is large enough to make that rare). The naive one-counter
script of bench/baselines.py runs the same way, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import redis
from redis.asyncio import Redis as AsyncRedis

from budgetwarden.store._embedded import EmbeddedRedis, free_port
from budgetwarden.store._store import load_lua

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, publish  # noqa: E402
from baselines import NAIVE_LUA  # noqa: E402
from scale import ScriptSpy, limiter, preload_check  # noqa: E402

RAND = "__rand_int__"
STEP = "bench-step-0"
LEASE_S = 600  # the sidecar's default lease
CONNECTIONS = 50


async def record_check(url: str, tenant: str, task: str) -> tuple[str, list[str]]:
    """Run one real check through the sidecar's Limiter and return the SHA and the EVALSHA arguments it sent."""
    client = AsyncRedis.from_url(url)
    try:
        checks = limiter(client)
        spy = ScriptSpy(checks.store._check)
        checks.store._check = spy  # type: ignore[assignment]
        request = replace(preload_check(tenant, 0, STEP), task_id=task, lease_seconds=LEASE_S)
        reservation = await checks.check(request)
    finally:
        await client.aclose()
    if reservation.lease_expires_ms is None or reservation.replayed:
        raise RuntimeError(f"the recorded check was not reserved: {reservation.verdict}")
    rid = reservation.reservation_id
    argv = [str(len(spy.keys)), *spy.keys, *spy.args]
    if not any(rid in a for a in spy.keys) or not any(STEP in a for a in spy.args):
        raise RuntimeError(f"reservation id or step id not found in the recorded call: {argv}")
    return spy.script.sha, [a.replace(rid, RAND).replace(STEP, RAND) for a in argv]


@dataclass
class Run:
    name: str
    rate: float
    avg: float
    p50: float
    p95: float
    p99: float
    max: float
    usec_per_call: float


def benchmark(name: str, port: int, client: redis.Redis, command: list[str], requests: int, keyspace: int) -> Run:
    client.config_resetstat()
    done = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-n", str(requests), "-c", str(CONNECTIONS),
         "-r", str(keyspace), "--csv", *command],
        capture_output=True, text=True, check=True, timeout=3600,
    )  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    if not rows:
        raise RuntimeError(f"no result from redis-benchmark: {done.stdout!r} {done.stderr!r}")
    row = rows[-1]
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    errors = int(stats.get("failed_calls", 0)) + int(stats.get("rejected_calls", 0))
    if errors:
        raise RuntimeError(f"{name}: {errors} EVALSHA calls failed: {client.info('errorstats')}")
    return Run(
        name, float(row["rps"]), float(row["avg_latency_ms"]), float(row["p50_latency_ms"]),
        float(row["p95_latency_ms"]), float(row["p99_latency_ms"]), float(row["max_latency_ms"]),
        float(stats.get("usec_per_call", float("nan"))),
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200_000, help="calls per script")
    parser.add_argument("--keyspace", type=int, default=1_000_000_000, help="redis-benchmark -r")
    parser.add_argument("--no-aof", action="store_true", help="run Valkey without its append-only file")
    parser.add_argument("--smoke", action="store_true", help="a few thousand calls, nothing written")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    if shutil.which("redis-benchmark") is None:
        print("redis-benchmark not found (apt-get install redis-tools); Redis baseline skipped")
        return 0
    requests = 5_000 if args.smoke else args.requests
    version = subprocess.run(["redis-benchmark", "--version"], capture_output=True, text=True, check=False).stdout
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        valkey = EmbeddedRedis(Path(tmp) / "valkey", port=port, persistent=not args.no_aof)
        url = valkey.start()
        client = redis.Redis.from_url(url)
        try:
            server = client.info("server")
            sha = client.script_load(load_lua("check"))
            recorded_sha, check_argv = asyncio.run(record_check(url, "bench", "task-0"))
            if recorded_sha != sha:
                raise RuntimeError(f"the store runs {recorded_sha}, SCRIPT LOAD of check.lua gave {sha}")
            naive_sha = client.script_load(NAIVE_LUA)
            naive_argv = ["2", "naive:{bench}:task-0", f"naive:{{bench}}:r:{RAND}", "1000", str(10**15)]
            runs.append(benchmark("check.lua (budgetwarden's check)", port, client, ["EVALSHA", sha, *check_argv],
                                  requests, args.keyspace))  # fmt: skip
            runs.append(benchmark("naive one-counter script (bench/baselines.py)", port, client,
                                  ["EVALSHA", naive_sha, *naive_argv], requests, args.keyspace))  # fmt: skip
            reservations = int(client.zcard(next(k for k in check_argv if k.endswith(":leases"))))
        finally:
            client.close()
            valkey.stop()

    server_name = "Valkey" if "valkey_version" in server else "Redis"
    server_version = server.get("valkey_version", server.get("redis_version", "?"))
    persistence = "no AOF (--no-aof)" if args.no_aof else "AOF everysec"
    command = f".venv/bin/python bench/redis_baseline.py --requests {requests}"
    if args.no_aof:
        command += " --no-aof"
    printable = [a.encode("unicode_escape").decode() for a in check_argv]  # the packed fields' separators show
    shown = " ".join(["EVALSHA", sha[:8] + "…", *(f"'{a}'" if " " in a or not a else a for a in printable)])
    check = runs[0]
    lines = [
        f"### Redis alone: the check script under redis-benchmark ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Command: `{command}` ({version.strip()}, {CONNECTIONS} connections, no pipelining, "
        f"-r {args.keyspace:,}; {server_name} {server_version} with {persistence}; redis-benchmark and the server on "
        "the same cores).",
        "",
        "| script | calls/s | avg ms | p50 ms | p95 ms | p99 ms | max ms | server µs per call |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {r.name} | {r.rate:,.0f} | {r.avg:.2f} | {r.p50:.2f} | {r.p95:.2f} | {r.p99:.2f} | {r.max:.2f} | "
            f"{r.usec_per_call:.1f} |"
            for r in runs
        ],
        "",
        f"- Redis alone: {check.rate:,.0f} checks/s ({check.rate / runs[1].rate:.2f}x the naive script); the "
        f"recorded check (one task, {len(check_argv) - 1} keys and arguments) ran {requests:,} times as new steps "
        f"({reservations:,} live reservations at the end, {requests + 1 - reservations:,} replays of colliding ids)",
        f"- the command: `{shown}`",
        "",
    ]
    publish(lines, None if args.smoke else args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
