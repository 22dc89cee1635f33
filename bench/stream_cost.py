"""The sidecar's own Python per CheckStream check, in-process and counted: a tree's and a base tree's, side by side.

    .venv/bin/python bench/stream_cost.py [--base DIR] [--tasks 1 1000] [--messages 20] [--reps 9]
    .venv/bin/python bench/stream_cost.py --profile [--tasks 1]                  (cProfile of this tree, by own time)

Each tree runs in its own process (``DIR/server`` and ``DIR/clients/python`` first on PYTHONPATH; without ``--base``,
this checkout alone): a sidecar (`Sidecar`, its gRPC server idle) on a fresh Valkey with the check harness's policy,
and `BudgetServicer._check_batch` called directly with 100-check messages like bench/harness.py's (one tenant, every
check a new step of one task or of 1,000). Per check: Python opcodes executed (`sys.settrace` with opcode events) and
Python function calls (cProfile), which do not depend on how busy the machine is; and CPU time of the loop's thread
(`time.thread_time`, least and median of ``--reps`` runs of ``--messages`` messages), which does (compare it only within
one run). The store call is real (the lean client, check.lua in Valkey); Valkey's own time is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _counting import (  # noqa: E402
    Work,
    opcodes,
    per_check,
    print_profile,
    run_in_tree,
    sidecar_servicer,
)


def _messages(count: int, tasks: int, rnd: random.Random, first: int) -> list[Any]:
    from google.protobuf.internal.encoder import _VarintBytes

    from budgetwarden_api.v1 import budget_pb2 as pb

    prefix = pb.CheckRequest(tenant_id="bench", estimated_input_tokens=800, max_output_tokens=200).SerializeToString()
    out = []
    n = first
    for _ in range(count):
        body = b""
        for _ in range(100):
            n += 1
            task = f"task-{rnd.randrange(tasks)}" if tasks > 1 else "task-0"
            check = prefix + pb.CheckRequest(task_id=task, step_id=f"s-{n}-{time.time_ns()}").SerializeToString()
            body += b"\x12" + _VarintBytes(len(check)) + check
        out.append(pb.CheckStreamRequest.FromString(body))
    return out


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    from budgetwarden_api.v1 import budget_pb2 as pb

    out: dict[str, Any] = {}
    async with sidecar_servicer() as sidecar:
        servicer = sidecar.servicer
        for tasks in args.tasks:
            rnd = random.Random(tasks)
            sent = 0

            def batch(count: int, tasks: int = tasks, rnd: random.Random = rnd) -> list[Any]:
                nonlocal sent
                sent += 100 * count
                return _messages(count, tasks, rnd, sent)

            for message in batch(10):  # warm: scripts loaded, windows and caches filled
                answer = await servicer._check_batch(message)
            assert all(r.response.decision == pb.DECISION_ALLOW for r in answer.results), answer.results[0]
            checks = 100 * args.messages

            def work(count: int = args.messages, batch: Callable[[int], list[Any]] = batch) -> Work:
                messages = batch(count)  # made before the measurement starts

                async def answer_all() -> None:
                    for message in messages:
                        await servicer._check_batch(message)

                return answer_all

            if args.profile:
                await print_profile(work())
                continue
            out[str(tasks)] = await per_check(work, checks, args.reps, await opcodes(work()))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=None, help="a source tree to compare (e.g. a git archive of main)")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 1000])
    parser.add_argument("--messages", type=int, default=20, help="100-check messages per measurement")
    parser.add_argument("--reps", type=int, default=9, help="CPU measurements (least and median shown)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the trees (with --base)")
    parser.add_argument("--profile", action="store_true", help="cProfile this tree instead")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or args.profile:
        measured = asyncio.run(_measure(args))
        if args.child:
            print(json.dumps(measured))
        return 0
    argv = ["--tasks", *map(str, args.tasks), "--messages", str(args.messages), "--reps", str(args.reps)]
    trees: list[tuple[str, Path | None]] = [("this tree", None)]
    if args.base is not None:
        trees.append((f"base ({args.base})", args.base.resolve()))
    print("| round | tree | tasks | opcodes per check | calls per check | CPU µs per check, least | median |")
    print("|---|---|---|---|---|---|---|")
    for round_number in range(1, (args.rounds if args.base is not None else 1) + 1):
        for name, tree in trees:
            for tasks, m in run_in_tree(Path(__file__), tree, argv).items():
                print(
                    f"| {round_number} | {name} | {int(tasks):,} | {m['opcodes']:,.0f} | {m['calls']:.1f} | "
                    f"{m['cpu_min']:.1f} | {m['cpu_median']:.1f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
