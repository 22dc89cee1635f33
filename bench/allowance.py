"""The local allowance (docs/local-allowance.md): what a check decided from a slice costs next to the same check on the
Redis path, in one run, and how much budget slices held by N sidecars strand, next to the bound of the slice rule.

In-process (a Limiter with and without Allowances, against one embedded Valkey), so the figures are the limiter's own
cost per check, without gRPC: the h2load harness measures the sidecar end to end.

    .venv/bin/python bench/allowance.py [--checks 4000] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from _common import machine, publish
from redis.asyncio import Redis

from budgetwarden.allowance import Allowances, AllowanceSettings
from budgetwarden.domain import CheckInput, Decision, stranded_bound
from budgetwarden.domain._policy import parse_policy
from budgetwarden.limiter import CheckResult, Limiter
from budgetwarden.store import AllowanceStore, BudgetStore, EmbeddedRedis

CEILING = 10**9
POLICY = parse_policy(
    f"""
tenants:
  acme:
    windows:
      day: {{tokens: {10 * CEILING}}}
models:
  small: {{input_usd_per_mtok: 1, output_usd_per_mtok: 4}}
default_task_type: plain
task_types:
  plain:
    per_task: {{tokens: {CEILING}}}
""",
    "bench",
)
NOW = 1_796_000_030_000


def request(task: str, n: int, tokens: int = 100) -> CheckInput:
    return CheckInput(
        tenant_id="acme",
        task_id=task,
        step_id=f"s{n}",
        task_type="plain",
        model="small",
        input_tokens=tokens + n % 7,  # varied steps: no two checks are the same request
        output_tokens=0,
        tool_calls=0,
    )


def limiter(redis: Redis, allowance: AllowanceSettings | None) -> Limiter:
    store = BudgetStore(redis)
    allowances = None if allowance is None else Allowances(AllowanceStore(store), allowance)
    return Limiter(
        store, lambda: POLICY, clock=lambda: NOW, check_deadline_s=30.0, store_deadline_s=30.0, allowances=allowances
    )


async def serial_us(redis: Redis, allowance: AllowanceSettings | None, checks: int, label: str) -> tuple[float, int]:
    """Microseconds per check, checking `checks` new steps of one task one after another; and how many were local."""
    checker = limiter(redis, allowance)
    task = f"{label}-{time.perf_counter_ns()}"
    first = await checker.check(request(task, 0))
    assert first.verdict.decision is Decision.ALLOW
    started = time.perf_counter()
    for n in range(1, checks + 1):
        result = await checker.check(request(task, n))
        assert isinstance(result, CheckResult)
        assert result.verdict.decision is Decision.ALLOW
    elapsed = time.perf_counter() - started
    local = 0 if checker.allowances is None else checker.allowances.local_checks
    if checker.allowances is not None:
        await checker.allowances.close(NOW)
    return elapsed / checks * 1e6, local


async def stranded(redis: Redis, sidecars: int, cap: int, share_bp: int, left: int) -> tuple[int, int, int]:
    """N sidecars each check one step of a task with `left` tokens: what their slices hold unused (stranded), the
    bound of the rule, and what a check on the Redis path still finds free."""
    await redis.flushall()
    ceiling_policy = parse_policy(
        f"""
tenants:
  acme: {{}}
models:
  small: {{input_usd_per_mtok: 1, output_usd_per_mtok: 4}}
default_task_type: plain
task_types:
  plain:
    per_task: {{tokens: {left + 1}}}
""",
        "bench",
    )
    store = BudgetStore(redis)
    first = Limiter(store, lambda: ceiling_policy, clock=lambda: NOW, check_deadline_s=30.0, store_deadline_s=30.0)
    await first.check(request("t", 0, 1))  # the task's first check, 1 token: `left` remain
    holders = []
    for i in range(sidecars):
        allowances = Allowances(AllowanceStore(store), AllowanceSettings(cap_tokens=cap, share_bp=share_bp))
        holder = Limiter(
            store, lambda: ceiling_policy, clock=lambda: NOW, allowances=allowances, check_deadline_s=30.0,
            store_deadline_s=30.0,
        )  # fmt: skip
        await holder.check(request("t", 1000 + i, 1))
        holders.append(allowances)
    held = sum(slice_left.tokens for allowances in holders for slice_left in allowances.held().values())
    budget = await first.budget("acme", "t", "plain")
    task = budget.scopes[0][1]
    free = (task.limit or 0) - task.used - task.reserved
    for allowances in holders:
        await allowances.close(NOW)
    return held, stranded_bound(left, cap, share_bp, sidecars), free


async def run(args: argparse.Namespace) -> list[str]:
    with tempfile.TemporaryDirectory() as data, EmbeddedRedis(Path(data), persistent=False) as server:
        redis = Redis.from_url(server.url)
        settings = AllowanceSettings(cap_tokens=args.cap, share_bp=args.share_bp)
        rows: dict[str, list[float]] = {"Redis path": [], "local allowance": []}
        local_share = []
        for _ in range(args.rounds):  # A/B alternated, in one run
            rows["Redis path"].append((await serial_us(redis, None, args.checks, "redis"))[0])
            us, local = await serial_us(redis, settings, args.checks, "local")
            rows["local allowance"].append(us)
            local_share.append(local / args.checks)
        strand_rows: list[tuple[int, int, tuple[int, int, int]]] = [
            (left, n, await stranded(redis, n, args.cap, args.share_bp, left))
            for left in args.left
            for n in (1, 2, 4, 8)
        ]
        await redis.aclose()
    redis_us = statistics.median(rows["Redis path"])
    local_us = statistics.median(rows["local allowance"])
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = f".venv/bin/python bench/allowance.py --checks {args.checks} --rounds {args.rounds}"
    lines = [
        f"### Local allowance: checks decided locally vs. the Redis path, and stranded budget ({when})",
        "",
        f"Machine: {machine()}. Command: `{command}` (in-process Limiter against an embedded Valkey, no gRPC; "
        f"{args.checks} serial checks of new steps of one task per run, A/B alternated {args.rounds} times, median; "
        f"slices of min({args.cap:,} tokens, {args.share_bp / 100:g}% of what is left)).",
        "",
        "| path | µs per check (median) | checks/s | checks decided locally | ratio to the Redis path |",
        "|---|---|---|---|---|",
        f"| Redis path (check.lua per check) | {redis_us:.0f} | {1e6 / redis_us:,.0f} | 0% | 1.00 |",
        f"| local allowance | {local_us:.0f} | {1e6 / local_us:,.0f} | {statistics.median(local_share):.2%} | "
        f"{redis_us / local_us:.2f}x faster |",
        "",
        "Stranded budget: N sidecars each check one step (1 token) of a task and keep their slice, as they do until "
        "idle. Stranded is what the slices hold unused, which no other sidecar can grant; the bound is the rule's "
        "(domain.stranded_bound: the cap binds when the task has much left, the share when it has little); free is "
        "what a check on the Redis path still finds.",
        "",
        "| tokens left | sidecars with a slice | stranded tokens | share of what was left | bound | free for others |",
        "|---|---|---|---|---|---|",
    ]
    for left, n, (held, bound, free) in strand_rows:
        lines.append(f"| {left:,} | {n} | {held:,} | {held / left:.1%} | {bound:,} | {free:,} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checks", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cap", type=int, default=50_000, help="slice cap in tokens")
    parser.add_argument("--share-bp", type=int, default=1000, help="slice share of what is left, basis points")
    parser.add_argument(
        "--left", type=int, nargs="+", default=[100_000, 1_000_000], help="tokens a task has left (stranded table)"
    )
    parser.add_argument("--write", type=Path, default=None, help="write the results into this Markdown file")
    args = parser.parse_args()
    publish(asyncio.run(run(args)), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
