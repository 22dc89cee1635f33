"""In-process counting for the *_cost benchmarks (stream_cost.py, local_cost.py): Python opcodes and calls of a piece of
work, which do not depend on how busy the machine is, its CPU time, which does, a sidecar to measure, and running a
source tree's copy of a benchmark in its own process for a side-by-side with this checkout. No budgetwarden imports
at module level: a child process runs it against another tree."""

from __future__ import annotations

import contextlib
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

# A policy that never runs out: a cost benchmark measures the path that grants.
UNBOUNDED_POLICY = """
default_tenant: {windows: {day: {tokens: 1000000000000}, month: {tokens: 1000000000000}}}
default_model: {}
default_task_type: agent
task_types:
  agent: {per_task: {tokens: 1000000000000}, per_step: {tokens: 100000}}
"""

Work = Callable[[], Awaitable[object]]


@contextlib.asynccontextmanager
async def sidecar_servicer(**settings: Any) -> AsyncIterator[Any]:
    """A started sidecar's BudgetServicer (its gRPC server idle) on a fresh Valkey with the unbounded policy, metrics
    off; ``settings`` add to the sidecar's. Imports the tree on the path when called."""
    from budgetwarden.app import Settings
    from budgetwarden.app._sidecar import Sidecar
    from budgetwarden.store._embedded import EmbeddedRedis, free_port

    with tempfile.TemporaryDirectory() as tmp:
        valkey = EmbeddedRedis(Path(tmp) / "valkey", port=free_port(), persistent=True)
        url = valkey.start()
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(UNBOUNDED_POLICY)
        sidecar = Sidecar(
            Settings(
                listen=f"127.0.0.1:{free_port()}",
                redis_url=url,
                policy_file=policy,
                log_level="WARNING",
                check_deadline_ms=60_000,  # counts, not the fail mode, on a busy machine
                usage_stream_max_len=10_000_000,
                **settings,
            )
        )
        try:
            await sidecar.start()
            assert sidecar.servicer is not None
            yield sidecar
        finally:
            await sidecar.stop()
            valkey.stop()


async def opcodes(work: Work, by_function: dict[str, int] | None = None) -> int:
    """Python opcodes executed by ``work`` on this thread; ``by_function`` (if given) gets them per file:function."""
    count = 0

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
            if by_function is not None:
                code = frame.f_code
                where = "/".join(code.co_filename.rsplit("/", 2)[-2:]) + ":" + code.co_name
                by_function[where] = by_function.get(where, 0) + 1
        return tracer

    sys.settrace(tracer)
    try:
        await work()
    finally:
        sys.settrace(None)
    return count


async def calls(work: Work) -> int:
    """Python function calls made by ``work`` (cProfile's count)."""
    profile = cProfile.Profile()
    profile.enable()
    try:
        await work()
    finally:
        profile.disable()
    return int(pstats.Stats(profile).total_calls)  # type: ignore[attr-defined]


async def cpu_seconds(work: Work) -> float:
    """CPU time of this thread (the event loop's) while ``work`` runs."""
    started = time.thread_time()
    await work()
    return time.thread_time() - started


async def print_profile(work: Work, top: int = 40) -> None:
    """cProfile of ``work`` on this thread's CPU clock, by own time."""
    profile = cProfile.Profile(time.thread_time)
    profile.enable()
    try:
        await work()
    finally:
        profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(top)


async def per_check(make_work: Callable[[], Work], checks: int, reps: int, opcodes_made: int) -> dict[str, float]:
    """A benchmark's row: opcodes (counted by the caller), calls, and the least and median CPU µs of ``reps`` runs, per
    check of the ``checks`` each piece of work from ``make_work`` answers."""
    calls_made = await calls(make_work())
    cpu = sorted([await cpu_seconds(make_work()) / checks * 1e6 for _ in range(reps)])
    return {
        "opcodes": opcodes_made / checks,
        "calls": calls_made / checks,
        "cpu_min": cpu[0],
        "cpu_median": cpu[len(cpu) // 2],
    }


def run_in_tree(script: Path, tree: Path | None, argv: list[str]) -> Any:
    """``script --child argv`` in its own process, with ``tree``'s server and client first on the path (None: this
    checkout); returns the JSON it prints last."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = f"{tree / 'server'}:{tree / 'clients' / 'python'}"
    done = subprocess.run(
        [sys.executable, str(script), "--child", *argv], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])
