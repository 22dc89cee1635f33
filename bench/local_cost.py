"""The sidecar's own Python per unary Check decided by a local allowance, in-process and counted: a tree's and a base
tree's, side by side.

    .venv/bin/python bench/local_cost.py [--base DIR] [--checks 300] [--reps 9] [--rounds 2] [--vary-tokens]
    .venv/bin/python bench/local_cost.py --profile                    (cProfile of this tree, by own time)
    .venv/bin/python bench/local_cost.py --by-function                (opcodes per check by function, this tree)

Each tree runs in its own process (``DIR/server`` and ``DIR/clients/python`` first on PYTHONPATH; without ``--base``,
this checkout alone): a sidecar (`Sidecar`, its gRPC server idle, ``--local-allowance`` on, metrics off) on a fresh
Valkey, and `BudgetServicer.check` called directly with a context that has no deadline, on request bytes parsed as the
handler's deserializer does (every check a new step of one task, so every one after the slice's take is decided by
the slice; all ask the same tokens, or with ``--vary-tokens`` each a different number, so that no plan repeats). Per
check: Python opcodes executed (`sys.settrace` with opcode events) and Python function calls
(cProfile), which do not depend on how busy the machine is; and CPU time of the loop's thread (`time.thread_time`,
least and median of ``--reps`` runs), which does. The allowance sweep is held off (idle 600 s), so no settle call falls
in a measurement; its cost per settled step is the settle's, measured apart (docs/benchmarks.md, issue 17).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
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


class _Context:
    """What the unary handler reads of a grpc.aio context on an answered check: no caller deadline."""

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: Any, details: str = "") -> None:
        raise RuntimeError(f"aborted: {code} {details}")


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    from budgetwarden_api.v1 import budget_pb2 as pb

    try:
        from budgetwarden.transport._answering import lenient
    except ImportError:  # pragma: no cover - an older tree
        lenient = None
    parse = lenient(pb.CheckRequest) if lenient is not None else pb.CheckRequest.FromString

    out: dict[str, Any] = {}
    async with sidecar_servicer(
        local_allowance=True,
        local_allowance_cap_tokens=10**11,
        local_allowance_share=0.5,
        local_allowance_idle_ms=600_000,
    ) as sidecar:
        servicer = sidecar.servicer
        context = _Context()
        sent = 0

        def bodies(count: int) -> list[bytes]:
            nonlocal sent
            out = []
            for _ in range(count):
                sent += 1
                request = pb.CheckRequest(
                    tenant_id="bench",
                    task_id="task-0",
                    step_id=f"s-{sent}",
                    estimated_input_tokens=800 + (sent % 100_000 if args.vary_tokens else 0),
                    max_output_tokens=200,
                )
                out.append(request.SerializeToString())
            return out

        async def run(batch: list[bytes]) -> Any:
            answer = None
            for body in batch:
                answer = await servicer.check(parse(body), context)
            return answer

        answer = await run(bodies(50))  # warm: the first check on the Redis path, then the slice's take
        decoded = pb.CheckResponse.FromString(answer) if isinstance(answer, bytes) else answer
        assert decoded.decision == pb.DECISION_ALLOW, decoded
        allowances = sidecar.allowances
        assert allowances is not None
        local_before = allowances.local_checks

        def work(count: int = args.checks) -> Work:
            batch = bodies(count)  # made before the measurement starts

            async def answer_all() -> None:
                await run(batch)

            return answer_all

        if args.profile:
            await print_profile(work())
            return out
        by_function: dict[str, int] | None = {} if args.by_function else None
        opcodes_made = await opcodes(work(), by_function)
        if by_function is not None:
            for where, count in sorted(by_function.items(), key=lambda item: -item[1])[:40]:
                print(f"{count / args.checks:8.1f}  {where}")
            return out
        out = await per_check(work, args.checks, args.reps, opcodes_made)
        measured = args.checks * (2 + args.reps)
        assert allowances.local_checks - local_before == measured, "a check left the slice"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=None, help="a source tree to compare (e.g. a git archive of main)")
    parser.add_argument("--checks", type=int, default=300, help="checks per measurement")
    parser.add_argument("--reps", type=int, default=9, help="CPU measurements (least and median shown)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the trees (with --base)")
    parser.add_argument("--profile", action="store_true", help="cProfile this tree instead")
    parser.add_argument(
        "--vary-tokens", action="store_true", help="every check asks a different number of tokens (no plan repeats)"
    )
    parser.add_argument("--by-function", action="store_true", help="opcodes per check by function, of this tree")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or args.profile or args.by_function:
        measured = asyncio.run(_measure(args))
        if args.child:
            print(json.dumps(measured))
        return 0
    argv = ["--checks", str(args.checks), "--reps", str(args.reps), *(["--vary-tokens"] if args.vary_tokens else [])]
    trees: list[tuple[str, Path | None]] = [("this tree", None)]
    if args.base is not None:
        trees.append((f"base ({args.base})", args.base.resolve()))
    print("| round | tree | opcodes per check | calls per check | CPU µs per check, least | median |")
    print("|---|---|---|---|---|---|")
    for round_number in range(1, (args.rounds if args.base is not None else 1) + 1):
        for name, tree in trees:
            m = run_in_tree(Path(__file__), tree, argv)
            print(
                f"| {round_number} | {name} | {m['opcodes']:,.0f} | {m['calls']:.1f} | {m['cpu_min']:.1f} | "
                f"{m['cpu_median']:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
