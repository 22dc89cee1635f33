"""What check.lua costs Valkey, in instructions per check: Valkey runs under valgrind's callgrind, so the count does not
depend on how busy the machine is (CPU time and INFO commandstats' µs do, by 2x or more on a shared machine).

    .venv/bin/python bench/check_lua_cost.py TREE [TREE ...] [--calls 1500] [--write docs/benchmarks.md] [--profile DIR]

Each TREE is a source tree (e.g. a `git archive` of main, and `.`), whose _lib.lua + check.lua are loaded, or a .lua
file holding a whole script (for trying a variant), or `naive` (the naive one-counter script of bench/baselines.py, one
counter per check). One real check's EVALSHA is recorded from the sidecar's own Limiter
(bench/redis_baseline.py) and replayed with new step ids: a unary check (a batch of one), a batch of 100 checks of one
task, and a batch of 100 checks spread over 100 tasks. Valkey with its append-only file and the embedded server's
hash-max-listpack-value, as the sidecar's; TREE@N runs that tree's script on a Valkey with hash-max-listpack-value N
(64 is Valkey's own default, what an external server has unless set). Needs
valgrind (`apt-get install valgrind`); without it the script says so and exits 0. Slow: about 20 s per tree.
--profile DIR keeps each measurement's callgrind dump there (for `callgrind_annotate --inclusive=yes
DIR/callgrind.<tree>.unary`).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import itertools
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import redis

from budgetwarden.store._embedded import HASH_MAX_LISTPACK_VALUE, EmbeddedRedis, free_port, server_binary

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, publish  # noqa: E402
from redis_baseline import RAND, record_check  # noqa: E402

_ids = itertools.count()


# bench/baselines.py's naive one-counter script, taking check.lua's keys: per check, read the task's counter, add to
# it, write the reservation's amount (1 token, against a limit of 10^15).
NAIVE = """
local nwin = tonumber(string.match(ARGV[5], '^(%d+)'))
local out = {}
for k = nwin + 2, #KEYS, 2 do
  local resv, task = KEYS[k], KEYS[k + 1]
  local used = tonumber(redis.call('HGET', task, 'nreserved') or '0')
  if used + 1 > 1e15 then out[#out + 1] = 0 else
    redis.call('HINCRBY', task, 'nreserved', 1)
    redis.call('HSET', resv, 'amount', 1)
    out[#out + 1] = 1
  end
end
return out
"""


def script_source(tree: str) -> str:
    if tree == "naive":
        return NAIVE
    if tree.endswith(".lua"):
        return Path(tree).read_text()
    lua = Path(tree) / "server" / "budgetwarden" / "store" / "lua"
    return (lua / "_lib.lua").read_text() + "\n" + (lua / "check.lua").read_text()


def batch_call(recorded: list[str], checks: int, tasks: int) -> tuple[list[str], list[str]]:
    """The recorded call's keys and arguments with its one check repeated as ``checks`` new steps over ``tasks``."""
    nkeys = int(recorded[0])
    keys, args = recorded[1 : 1 + nkeys], recorded[1 + nkeys :]
    *head_keys, resv, task = keys
    *head_args, check = args
    out_keys, out_args = list(head_keys), list(head_args)
    for _ in range(checks):
        i = next(_ids)
        out_keys += [resv.replace(RAND, str(i)), f"{task}-{i % tasks}" if tasks > 1 else task]
        out_args.append(check.replace(RAND, str(i)))
    return out_keys, out_args


def dumps(out: str) -> list[str]:
    return sorted(glob.glob(out + ".*"), key=lambda name: int(name.rsplit(".", 1)[1]))


def instructions(
    pid: int, out: str, client: redis.Redis, run: list[tuple[list[str], list[str]]], sha: str, keep: str | None
) -> int:
    """Instructions Valkey executed over the calls: callgrind's counters zeroed before, dumped after."""
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    client.ping()  # the zeroing is done by the time Valkey has answered this
    for keys, args in run:
        client.evalsha(sha, len(keys), *keys, *args)
    before = len(dumps(out))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    while len(dumps(out)) == before:
        client.ping()
        time.sleep(0.1)
    time.sleep(0.5)  # the dump is written in full
    if keep:
        shutil.copy(dumps(out)[-1], keep)
    with open(dumps(out)[-1]) as dump:
        return next(int(line.split()[1]) for line in dump if line.startswith(("summary:", "totals:")))


def measure(spec: str, recorded: list[str], calls: int, profile: Path | None = None) -> list[float]:
    # TREE@N: Valkey with hash-max-listpack-value N (Valkey's own default is 64); TREE alone: the embedded server's.
    tree, _, listpack_value = spec.partition("@")
    scenarios = [(1, 1, calls), (100, 1, max(1, calls // 50)), (100, 100, max(1, calls // 50))]
    with tempfile.TemporaryDirectory() as tmp:
        port, out = free_port(), f"{tmp}/callgrind.out"
        process = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", str(server_binary()), "--port", str(port),
             "--appendonly", "yes", "--dir", tmp, "--save", "",
             "--hash-max-listpack-value", listpack_value or str(HASH_MAX_LISTPACK_VALUE)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=port)
        try:
            for _ in range(1200):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.1)
            sha = client.script_load(script_source(tree))
            for checks, tasks, _ in scenarios:  # the tasks initialised, the script warm
                keys, args = batch_call(recorded, checks, tasks)
                client.evalsha(sha, len(keys), *keys, *args)
            per_check = []
            for scenario, (checks, tasks, n) in enumerate(scenarios):
                run = [batch_call(recorded, checks, tasks) for _ in range(n)]
                keep = None
                if profile is not None:
                    name = tree.strip("/").replace("/", "_") or "tree"
                    keep = str(profile / f"callgrind.{name}.{('unary', 'batch1', 'batch100')[scenario]}")
                per_check.append(instructions(process.pid, out, client, run, sha, keep) / (n * checks))
            return per_check
        finally:
            client.close()
            process.terminate()
            process.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+")
    parser.add_argument("--calls", type=int, default=1500, help="unary calls (batches: a fiftieth of it)")
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="keep each measurement's callgrind dump in this directory (for callgrind_annotate)",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind not found (apt-get install valgrind); check.lua's instruction count skipped")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        valkey = EmbeddedRedis(Path(tmp) / "valkey", port=free_port(), persistent=False)
        url = valkey.start()
        try:
            _, recorded = asyncio.run(record_check(url, "bench", "task-0"))
        finally:
            valkey.stop()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    rows = [(tree, measure(tree, recorded, args.calls, args.profile)) for tree in args.trees]
    base = rows[0][1]
    lines = [
        f"### check.lua in instructions per check, under callgrind ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python bench/check_lua_cost.py {' '.join(args.trees)} --calls "
        f"{args.calls}`. Valkey ({server_binary().name}, AOF on, hash-max-listpack-value {HASH_MAX_LISTPACK_VALUE} "
        "unless a row says @N) under valgrind's callgrind: instructions it executed "
        "per check over the calls, EVALSHA parsing, the script, its commands and the append-only file's buffer "
        "included (not a time: it does not move with the machine's load). One real check's call, recorded from the "
        "sidecar's Limiter, replayed as new steps; the ratio is to the first row.",
        "",
        "| script | unary: Ir per check | ratio | 100 checks of 1 task: Ir per check | ratio "
        "| 100 checks of 100 tasks: Ir per check | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for tree, costs in rows:
        cells = " | ".join(f"{cost / 1000:,.1f}k | {cost / b:.2f}" for cost, b in zip(costs, base, strict=True))
        lines.append(f"| {tree} | {cells} |")
    lines.append("")
    publish(lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
