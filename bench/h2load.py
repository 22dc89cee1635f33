"""Unary Check driven by h2load, a C HTTP/2 load generator (Debian's nghttp2-client), against its baselines in one run.

    .venv/bin/python bench/h2load.py [--seconds 5] [--rounds 2] [--write docs/benchmarks.md]      (make bench)
    .venv/bin/python bench/h2load.py --smoke                                                       (a short run)

Servers, each its own process on one Valkey with an append-only file: the transport floor (an empty grpc.aio Check
handler) and the naive one-EVALSHA handler (bench/baselines.py), budgetwarden, and budgetwarden with unary
micro-batching off (BUDGETWARDEN_BATCH_UNARY_CHECKS=false: the A/B of the batching), and budgetwarden with redis-py
for the check's script call instead of its lean client (BUDGETWARDEN_LEAN_REDIS_CLIENT=false, batching on: the A/B of
the client).

Request bodies: h2load posts one file (-d) with every request, read with pread(2) per request. A CheckRequest with the
placeholders "#########" in its step id and "&&&&" in its task id is framed for gRPC (a 0 byte, then the length as 4
bytes big-endian) and bench/vary_body.c, preloaded into h2load, writes a counter into the step (so every request is a
new step, never the idempotent replay) and the counter modulo 1,000 into the task, in what each pread returns. The run
checks it: the new reservations in Valkey must equal the requests answered.

Throughput: one connection, one stream at a time (-c1 -m1, serial) and 16 concurrent streams (-c1 -m16), the servers
alternating, each round's ratios against the floor of the same round. Latency at a fixed offered rate: h2load --rps
with 64 streams allowed, per-request times from its --log-file; how late h2load itself started each request against
the schedule is shown beside them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import redis

from budgetwarden.store._embedded import EmbeddedRedis, free_port
from budgetwarden.store._keys import TenantKeys
from budgetwarden_api.v1 import budget_pb2 as pb

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _pyspy  # noqa: E402
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
from harness import POLICY, rss_mb, start, wait_port  # noqa: E402

CHECK_PATH = "/budgetwarden.v1.BudgetService/Check"
REDIS_PY = "budgetwarden, redis-py"
SERVERS = ("floor", "naive", "budgetwarden", "budgetwarden, batching off", REDIS_PY)
# Variants, run when named in --servers: the local allowance (--local-allowance; every request a new step of ONE task,
# so that after the first check its slice decides them), and with --base, the same servers from another checkout's
# server/ directory (the code before a change: the A/B of it in one run).
LOCAL = "budgetwarden, local allowance"
BASE = "budgetwarden, base"
BASE_LOCAL = "budgetwarden, base, local allowance"
VARIANTS = (LOCAL, BASE, BASE_LOCAL)
# --servers takes these short names.
SHORT = {
    "floor": "floor",
    "naive": "naive",
    "bw": "budgetwarden",
    "bw-batching-off": "budgetwarden, batching off",
    "bw-redis-py": REDIS_PY,
    "bw-local": LOCAL,
    "base": BASE,
    "base-local": BASE_LOCAL,
}
RATES = (100, 1000, 3000)


def grpc_body(path: Path, tenant: str, run: str, *, one_task: bool = False) -> Path:
    """A length-prefixed CheckRequest whose task (unless ``one_task``) and step the shim varies per request."""
    message = pb.CheckRequest(
        tenant_id=tenant,
        task_id="task-one" if one_task else f"task-{TASK_MARK}",
        step_id=f"{run}-{STEP_MARK}",
        estimated_input_tokens=800,
        max_output_tokens=200,
    ).SerializeToString()
    return write_grpc_body(path, message)


@dataclass
class Run:
    scenario: str
    server: str
    round: int
    requests: int = 0
    seconds: float = 0.0
    failed: int = 0
    latencies_us: list[float] = field(default_factory=list)
    late_us: list[float] = field(default_factory=list)  # fixed rate: start behind schedule
    scheduled_us: list[float] = field(default_factory=list)  # fixed rate: latency from the schedule
    server_us: float = float("nan")
    redis_us: float = float("nan")
    new_reservations: int | None = None
    sent: int = 0  # request bodies h2load sent, warm-up included
    script_calls: int = 0  # EVALSHA calls Valkey ran during the measurement (only this server was loaded)
    script_usec: float = 0.0  # and the time Valkey spent in them
    offered: float = 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def ms(self, q: float, values: list[float] | None = None) -> float:
        values = self.latencies_us if values is None else values
        return percentile(values, q) / 1000 if values else float("nan")


def h2load(
    url: str, body: Path, shim: Path, log: Path, *, streams: int, seconds: float, rps: int = 0
) -> tuple[int, int, float, int]:
    """Runs h2load for ``seconds``; returns (succeeded, failed, measured seconds) from its summary and the number of
    request bodies it sent (warm-up included), which the shim counted."""
    command = [
        "h2load", "-c1", f"-m{streams}", "-t1", f"-D{int(seconds * 1000)}ms", "--warm-up-time=500ms", "-d", str(body),
        "-H", "content-type: application/grpc", "-H", "te: trailers", f"--log-file={log}", url,
    ]  # fmt: skip
    if rps:
        command[1:1] = [f"--rps={rps}"]
    sent = log.with_suffix(".sent")
    env = os.environ | {"LD_PRELOAD": str(shim), "VARY_COUNT_FILE": str(sent)}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    succeeded = failed = 0
    took = seconds
    for line in out.splitlines():
        if line.startswith("requests:"):
            parts = {word: int(count) for count, word in _pairs(line.split(":", 1)[1])}
            succeeded, failed = parts["succeeded"], parts["failed"] + parts["errored"] + parts["timeout"]
        elif line.startswith("finished in"):
            took = float(line.split()[2].rstrip("s,"))
    return succeeded, failed, took, int(sent.read_text())


def _pairs(text: str) -> list[tuple[str, str]]:
    """h2load's "N total, N started, ..." as (count, word) pairs."""
    return [tuple(part.split()[:2]) for part in text.split(",") if len(part.split()) >= 2]  # type: ignore[misc]


def read_log(log: Path) -> tuple[list[float], list[float]]:
    """(start µs since epoch, µs to the end of the response) per request, in start order."""
    rows = []
    for line in log.read_text().splitlines():
        start_us, status, took_us = line.split("\t")[:3]
        if status == "200":
            rows.append((float(start_us), float(took_us)))
    rows.sort()
    return [r[0] for r in rows], [r[1] for r in rows]


def script_stats(client: redis.Redis) -> tuple[int, float]:
    """EVALSHA calls Valkey has run so far, and the microseconds it spent in them (INFO commandstats)."""
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), float(stats.get("usec", 0))


def lateness(starts: list[float], rate: float) -> list[float]:
    """How far behind an even schedule at ``rate`` from the first request each request started (µs, at least 0)."""
    if not starts:
        return []
    first = starts[0]
    return [max(0.0, at - (first + i * 1e6 / rate)) for i, at in enumerate(starts)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the throughput measurements")
    parser.add_argument("--smoke", action="store_true", help="one short round, nothing written")
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument(
        "--servers",
        default="floor,naive,bw,bw-batching-off,bw-redis-py",
        help=f"comma-separated short names, in the order they alternate; of {', '.join(SHORT)}",
    )
    parser.add_argument("--base", type=Path, default=None, help="a checkout whose server/ the base variants run")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the rounds, one more serial measurement of each server under py-spy (not in the table): where "
        "its busy samples went",
    )
    args = parser.parse_args()
    unknown = [name for name in args.servers.split(",") if name not in SHORT]
    if unknown:
        raise SystemExit(f"unknown servers: {', '.join(unknown)}; known: {', '.join(SHORT)}")
    servers = tuple(SHORT[name] for name in args.servers.split(","))
    if "floor" not in servers:
        raise SystemExit("--servers must include floor (the ratios are to it)")
    if any(name.startswith(BASE) for name in servers) and args.base is None:
        raise SystemExit("the base variants need --base (a checkout of the code to compare against)")
    seconds = 1.0 if args.smoke else args.seconds
    rounds = 1 if args.smoke else args.rounds
    if shutil.which("h2load") is None:
        raise SystemExit("bench/h2load.py needs h2load (Debian: nghttp2-client; `make bench` installs it)")
    if args.profile and not _pyspy.available():
        raise SystemExit("--profile needs py-spy (`make dev` installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | {"OTEL_SDK_DISABLED": "true"}
    runs: list[Run] = []
    notes: list[str] = []
    profiles: list[str] = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        shim = build_shim(tmp)
        valkey = EmbeddedRedis(tmp / "valkey", port=free_port(), persistent=True)
        url = valkey.start()
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY)
        addrs = {server: f"127.0.0.1:{free_port()}" for server in servers}
        sidecar = ["-m", "budgetwarden", "serve", "--redis-url", url, "--policy-file", str(policy),
                   "--log-level", "WARNING", "--usage-stream-max-len", "10000000"]  # fmt: skip
        # A slice big enough for the whole run: every check of the one task after its first is decided locally.
        local_allowance = ["--local-allowance", "--local-allowance-cap-tokens", "1000000000"]
        base_env = env | {"PYTHONPATH": str(args.base.resolve() / "server")} if args.base is not None else env
        starters = {
            "floor": lambda: start([str(HERE / "baselines.py"), "floor", "--listen", addrs["floor"]], env),
            "naive": lambda: start(
                [str(HERE / "baselines.py"), "naive", "--listen", addrs["naive"], "--redis-url", url], env
            ),
            "budgetwarden": lambda: start([*sidecar, "--listen", addrs["budgetwarden"]], env),
            "budgetwarden, batching off": lambda: start(
                [*sidecar, "--listen", addrs["budgetwarden, batching off"]],
                env | {"BUDGETWARDEN_BATCH_UNARY_CHECKS": "false"},
            ),
            REDIS_PY: lambda: start(
                [*sidecar, "--listen", addrs[REDIS_PY]], env | {"BUDGETWARDEN_LEAN_REDIS_CLIENT": "false"}
            ),
            LOCAL: lambda: start([*sidecar, "--listen", addrs[LOCAL], *local_allowance], env),
            BASE: lambda: start([*sidecar, "--listen", addrs[BASE]], base_env),
            BASE_LOCAL: lambda: start([*sidecar, "--listen", addrs[BASE_LOCAL], *local_allowance], base_env),
        }
        processes = {server: starters[server]() for server in servers}
        client = redis.Redis.from_url(url)
        try:
            for server in servers:
                if server.startswith("budgetwarden"):
                    wait_serving(addrs[server])
                else:
                    wait_port(addrs[server])
            redis_pid = valkey.pid
            assert redis_pid is not None
            counter = 0

            def measure(
                scenario: str, server: str, round_: int, streams: int, rps: int = 0, profile: Path | None = None
            ) -> Run:
                nonlocal counter
                counter += 1
                tenant = f"h2-{counter}"
                local = server.endswith("local allowance")
                body = grpc_body(tmp / f"body-{counter}", tenant, f"r{counter}", one_task=local)
                log = tmp / f"log-{counter}"
                leases = TenantKeys(tenant).leases
                cpu, store = cpu_seconds(processes[server].pid), cpu_seconds(redis_pid)
                calls, usec = script_stats(client)
                sampler = None if profile is None else _pyspy.record(processes[server].pid, seconds, profile)
                done, failed, took, sent = h2load(
                    f"http://{addrs[server]}{CHECK_PATH}", body, shim, log, streams=streams, seconds=seconds, rps=rps
                )
                if sampler is not None:
                    _, problem = sampler.communicate(timeout=60 + seconds)
                    if sampler.returncode:
                        raise SystemExit(f"py-spy failed: {problem.decode(errors='replace')}")
                run = Run(scenario, server, round_, done, took, failed, offered=rps)
                calls_after, usec_after = script_stats(client)
                run.script_calls, run.script_usec = calls_after - calls, usec_after - usec
                checks = max(1, done)
                run.server_us = (cpu_seconds(processes[server].pid) - cpu) / checks * 1e6
                run.redis_us = (cpu_seconds(redis_pid) - store) / checks * 1e6
                starts, run.latencies_us = read_log(log)
                if rps:
                    run.late_us = lateness(starts, rps)
                    run.scheduled_us = [late + took for late, took in zip(run.late_us, run.latencies_us, strict=True)]
                if server.startswith("budgetwarden") and not local:
                    # Every answered check (warm-up included) is a new step: one new lease each. (Steps granted from
                    # a local slice are recorded in Valkey when it settles them, later: not counted.)
                    run.new_reservations = int(client.zcard(leases))
                run.sent = sent
                runs.append(run)
                print(f"{scenario:>24} {server:>28}: {run.rate:8,.0f}/s p50 {run.ms(0.5):.3f} ms", flush=True)
                return run

            for server in servers:  # warm-up: connections, imports, script loading
                measure("warm-up", server, 0, 16)
            runs.clear()
            for round_ in range(1, rounds + 1):
                for streams in (1, 16):
                    for server in servers:
                        measure("serial (-m1)" if streams == 1 else "16 streams (-m16)", server, round_, streams)
            for rps in RATES:
                for server in servers:
                    measure(f"{rps:,}/s offered", server, 1, 64, rps=rps)
            if args.profile:
                for server in servers:
                    raw = tmp / f"profile-{len(profiles)}.txt"
                    profiled = measure("profiled, serial (-m1)", server, 0, 1, profile=raw)
                    runs.remove(profiled)  # sampled: not a measurement for the table
                    text = raw.read_text() if raw.exists() else ""
                    profiles += ["", f"**{server}** ({profiled.rate:,.0f} checks/s while sampled):", ""]
                    profiles += _pyspy.summary(text)
            info = client.info("commandstats")
            for server in [name for name in ("budgetwarden", REDIS_PY) if name in servers]:
                notes.append(f"{server}: {rss_mb(processes[server].pid):.0f} MB RSS after the run")
            evalsha = info.get("cmdstat_evalsha", {})
            if evalsha:
                notes.append(
                    f"Valkey INFO commandstats over the whole run, all servers: EVALSHA {evalsha['calls']:,} calls, "
                    f"{evalsha['usec_per_call']:.1f} µs per call"
                )
        finally:
            client.close()
            for process in processes.values():
                process.terminate()
                process.wait(30)
            valkey.stop()

    lines = report(runs, seconds, rounds, args.smoke, servers, args.base, args.profile)
    lines += ["", *[f"- {note}" for note in notes], ""]
    if profiles:
        lines += [
            "Profiles: after the rounds, one more serial measurement of each server with py-spy attached (`py-spy "
            "record --rate 200 --native --format raw`, as long as the measurement; not in the tables above: py-spy "
            "pauses the server at each sample, so it runs slower meanwhile, and the shares are what to read). Samples "
            "of a thread waiting (its innermost frame epoll_wait, a lock) are left out; each busy one is counted where "
            "its innermost Python frame is: time in C called from Python (protobuf's parse, gRPC's Cython core, a "
            "syscall) counts where it was called from.",
            *profiles,
            "",
        ]
    publish(lines, None if args.smoke else args.write)
    return 0


def report(
    runs: list[Run],
    seconds: float,
    rounds: int,
    smoke: bool,
    servers: tuple[str, ...] = SERVERS,
    base: Path | None = None,
    profile: bool = False,
) -> list[str]:
    command = ".venv/bin/python bench/h2load.py" + (
        " --smoke" if smoke else f" --seconds {seconds:g} --rounds {rounds}"
    )
    if servers != SERVERS:
        names = {name: short for short, name in SHORT.items()}
        command += f" --servers {','.join(names[server] for server in servers)}"
    if base is not None:
        command += f" --base {base}"
    if profile:
        command += " --profile"
    # A run of other servers than the default set (an A/B of a change) is its own result, not the table's next run.
    title = "budgetwarden vs. its baselines" if servers == SERVERS else f"{', '.join(servers[1:])} vs. the floor"
    lines = [
        f"### Unary Check under h2load: {title} ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Command: `{command}`. Each measurement: `h2load -c1 -m<streams> -t1 "
        f"-D{seconds:g} --warm-up-time=500ms -d <body> -H 'content-type: application/grpc' -H 'te: trailers' "
        "--log-file=<log> http://<server>/budgetwarden.v1.BudgetService/Check` (plus `--rps=<rate>` at a fixed "
        "rate), with bench/vary_body.c preloaded so that every request is a new step (1,000 tasks). Valkey with AOF "
        "everysec; servers, Valkey and h2load on the same 2 cores; metrics off. Latency: h2load's per-request time "
        "from its log (request start to the end of the response). CPU: the server's and Valkey's CPU time per "
        "answered check. Checks per script call and Valkey µs per call: EVALSHA calls and their time in Valkey's "
        "INFO commandstats over the measurement. New steps: leases Valkey holds afterwards, of the request bodies "
        "h2load sent (warm-up included, counted by the shim): equal means every request was a new step and reserved "
        "(none a replay, none refused); up to the streams in flight fewer when h2load's end cut their calls."
        + (
            " The local-allowance variants' requests are new steps of ONE task, with slices of up to 1,000,000,000 "
            "tokens (`--local-allowance --local-allowance-cap-tokens 1000000000`): every check after the task's first "
            "is decided locally; their new-steps column is empty (a step granted locally reaches Valkey when its slice "
            "is settled, later), and the slices' settling shows in the Valkey columns of whichever server runs then."
            if any(server.endswith("local allowance") for server in servers)
            else ""
        )
        + (f" Base: the server/ directory of {base}, run with PYTHONPATH." if base is not None else ""),
        "",
        "| scenario | round | server | checks/s | vs. floor | mean ms | p50 ms | p99 ms | p99.9 ms | failed "
        "| server CPU µs/check | Valkey CPU µs/check | checks per script call | Valkey µs per call | new steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    floors = {(r.scenario, r.round): r.rate for r in runs if r.server == "floor"}
    for r in runs:
        if r.offered:
            continue
        floor = floors.get((r.scenario, r.round), float("nan"))
        new = f"{r.new_reservations:,} of {r.sent:,}" if r.new_reservations is not None else ""
        mean = statistics.fmean(r.latencies_us) / 1000 if r.latencies_us else float("nan")
        # The floor calls no script: what Valkey ran meanwhile was the idle sidecars' background work.
        scripted = r.script_calls and r.server != "floor"
        per_call = f"{r.sent / r.script_calls:.2f}" if scripted else ""
        call_us = f"{r.script_usec / r.script_calls:.0f}" if scripted else ""
        lines.append(
            f"| {r.scenario} | {r.round} | {r.server} | {r.rate:,.0f} | {r.rate / floor:.2f} | {mean:.3f} | "
            f"{r.ms(0.5):.3f} | {r.ms(0.99):.3f} | {r.ms(0.999):.3f} | {r.failed} | {r.server_us:.0f} | "
            f"{r.redis_us:.0f} | {per_call} | {call_us} | {new} |"
        )
    lines += [
        "",
        "At a fixed offered rate (`--rps`, up to 64 streams in flight): latency from each request's actual start, "
        "and how late h2load started it against an even schedule from the first request (its own lateness, and "
        "its wait for a free stream when the server falls behind), which the latency columns do not include; the "
        "last column counts from the schedule, so it does.",
        "",
        "| offered | server | answered/s | p50 ms | p99 ms | p99.9 ms | max ms | failed | h2load late p50 ms "
        "| late p99 ms | server CPU µs/check | p99 from the schedule ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if not r.offered:
            continue
        top = max(r.latencies_us) / 1000 if r.latencies_us else float("nan")
        lines.append(
            f"| {r.offered:,.0f}/s | {r.server} | {r.rate:,.0f} | {r.ms(0.5):.3f} | {r.ms(0.99):.3f} | "
            f"{r.ms(0.999):.3f} | {top:.3f} | {r.failed} | {r.ms(0.5, r.late_us):.3f} | {r.ms(0.99, r.late_us):.3f} | "
            f"{r.server_us:.0f} | {r.ms(0.99, r.scheduled_us):.3f} |"
        )
    lines += ["", "Ratios to the floor of the same round, spread over the rounds:", ""]
    for scenario in ("serial (-m1)", "16 streams (-m16)"):
        for server in servers:
            if server == "floor":
                continue
            ratios = [
                r.rate / floors[(r.scenario, r.round)]
                for r in runs
                if r.scenario == scenario and r.server == server and (r.scenario, r.round) in floors
            ]
            if ratios:
                lines.append(f"- {scenario}, {server}: {min(ratios):.2f} to {max(ratios):.2f} of the floor")
    return lines


if __name__ == "__main__":
    sys.exit(main())
