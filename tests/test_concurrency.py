"""Many concurrent checks against one task and one tenant, from several OS processes.

Every worker process runs its own event loop and its own Redis (or gRPC) client, so the only thing that keeps the
counters right is the atomicity of the Lua scripts. Afterwards the counters are read back from Redis and compared with
what the workers were told: the total granted never exceeds any ceiling, it ends within one step of the binding one
when demand exceeds it, the reserved counters equal the sum granted, and no step holds two reservations. Checks of one
step from many processes reserve once; releases, reports and lapsing leases racing on the same steps end every hold
exactly once; a report sent twice at once is applied once.
"""

from __future__ import annotations

import asyncio
import random
import threading
import traceback
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from budgetwarden.domain._model import (
    CheckInput,
    Counter,
    Decision,
    Outcome,
    Reason,
    ReleaseStatus,
    ReportStatus,
    UsageInput,
)
from budgetwarden.domain._policy import parse_policy
from budgetwarden.limiter import BudgetView, Limiter
from budgetwarden.store._keys import TenantKeys, reservation_id
from budgetwarden.store._store import BudgetStore, IdempotencyConflictError
from budgetwarden_client import BudgetClient, pb

from support import run_processes

TENANT = "acme"
PROCESSES = 4
MAX_STEP = 500
BARRIER_TIMEOUT_S = 60.0
CHURN_STEPS = 6
# A fixed clock for the limiter-level tests: the windows cannot roll over while a test runs.
FIXED_NOW_MS = int(datetime(2025, 6, 17, 12, 0, tzinfo=UTC).timestamp() * 1000)

Job = tuple[str, str, int]  # task id, step id, tokens
Row = dict[str, Any]

pytestmark = pytest.mark.slow


def policy_text(*, task: int, step: int, day: int, month: int | None = None, time_zone: str = "UTC") -> str:
    month_line = f"\n      month: {{tokens: {month}}}" if month is not None else ""
    return f"""\
version: 1
unknown_tenants: reject
default_model: {{}}  # free: these tests count tokens only
tenants:
  {TENANT}:
    time_zone: {time_zone}
    windows:
      day: {{tokens: {day}}}{month_line}
default_task_type: agent
task_types:
  agent:
    per_task: {{tokens: {task}}}
    per_step: {{tokens: {step}}}
    lease_seconds: 600
min_lease_seconds: 1  # the lapsing-lease races ask for 2 s leases
"""


def noon_zone() -> str:
    """An IANA zone in which it is about noon now, so that a sidecar on the wall clock sees no window roll over."""
    offset = 12 - datetime.now(UTC).hour  # -11 .. +12 hours east of UTC
    if offset == 0:
        return "Etc/GMT"
    return f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"  # the Etc/ zones count hours west of UTC


def make_limiter(client: AsyncRedis, text: str, now_ms: int | Callable[[], int]) -> Limiter:
    loaded = parse_policy(text, "test")
    clock = now_ms if callable(now_ms) else lambda: now_ms
    return Limiter(BudgetStore(client), lambda: loaded, check_deadline_s=60.0, clock=clock)


def check_input(task_id: str, step_id: str, tokens: int) -> CheckInput:
    return CheckInput(
        tenant_id=TENANT,
        task_id=task_id,
        step_id=step_id,
        task_type="",
        model="m",
        input_tokens=tokens,
        output_tokens=0,
        tool_calls=0,
    )


# ---------------------------------------------------------------------------------------------------------------
# Worker processes (module level, so that the spawn start method can import them).


async def _limiter_rounds(
    url: str, text: str, now_ms: int, rounds: Sequence[Sequence[Job]], concurrency: int, barrier: Any
) -> list[list[Row]]:
    client = AsyncRedis.from_url(url)
    try:
        limiter = make_limiter(client, text, now_ms)
        # Warm up (connect, load the script) before the start line, so the checks really overlap.
        await limiter.budget(TENANT, "warm-up", "")
        gate = asyncio.Semaphore(concurrency)

        async def one(job: Job) -> Row:
            task_id, step_id, tokens = job
            async with gate:
                result = await limiter.check(check_input(task_id, step_id, tokens))
            return {
                "task": task_id,
                "step": step_id,
                "tokens": tokens,
                "decision": int(result.verdict.decision),
                "reason": int(result.verdict.reason),
                "binding": result.verdict.binding_scope,
                "granted": result.verdict.granted,
                "rid": result.reservation_id,
                "lease": result.lease_expires_ms,
                "replayed": result.replayed,
                "fail_mode": result.from_fail_mode,
            }

        out = []
        for jobs in rounds:
            await asyncio.to_thread(barrier.wait, BARRIER_TIMEOUT_S)
            out.append(list(await asyncio.gather(*(one(job) for job in jobs))))
        return out
    finally:
        await client.aclose()


def limiter_worker(
    index: int,
    results: Any,
    barrier: Any,
    url: str,
    text: str,
    now_ms: int,
    rounds: Sequence[Sequence[Job]],
    concurrency: int,
) -> None:
    try:
        results.put((index, None, asyncio.run(_limiter_rounds(url, text, now_ms, rounds, concurrency, barrier))))
    except BaseException:
        barrier.abort()
        results.put((index, traceback.format_exc(), None))


def _grpc_call(client: BudgetClient, kind: str, job: tuple[Any, ...]) -> Row:
    if kind == "check":
        task_id, step_id, tokens = job
        answer = client.check(
            tenant_id=TENANT, task_id=task_id, step_id=step_id, estimated_input_tokens=tokens, max_output_tokens=0
        )
        return {
            "task": task_id,
            "step": step_id,
            "tokens": tokens,
            "decision": answer.decision,
            "reason": answer.reason,
            "binding": answer.binding_scope,
            "granted": answer.granted_tokens,
            "rid": answer.reservation_id,
            "replayed": answer.replayed,
            "fail_mode": answer.from_fail_mode,
        }
    task_id, step_id, tokens, key = job
    record = pb.UsageRecord(
        tenant_id=TENANT, task_id=task_id, step_id=step_id, input_tokens=tokens, idempotency_key=key
    )
    (result,) = client.report([record]).results
    return {
        "task": task_id,
        "step": step_id,
        "tokens": tokens,
        "status": result.status,
        "rid": result.reservation_id,
        "charged": result.charged_tokens,
        "refunded": result.refunded_tokens,
        "overage": result.overage_tokens,
    }


def grpc_worker(
    index: int, results: Any, barrier: Any, addr: str, kind: str, per_thread: Sequence[Sequence[tuple[Any, ...]]]
) -> None:
    try:
        rows: list[Row] = []
        errors: list[str] = []
        lock = threading.Lock()

        def run(jobs: Sequence[tuple[Any, ...]]) -> None:
            try:
                with BudgetClient(addr, timeout=60.0) as client:
                    client.get_budget(tenant_id=TENANT)  # connect before the start line
                    barrier.wait(BARRIER_TIMEOUT_S)
                    mine = [_grpc_call(client, kind, job) for job in jobs]
                with lock:
                    rows.extend(mine)
            except BaseException:
                barrier.abort()
                with lock:
                    errors.append(traceback.format_exc())

        threads = [threading.Thread(target=run, args=(jobs,)) for jobs in per_thread]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise RuntimeError("\n".join(errors))
        results.put((index, None, rows))
    except BaseException:
        results.put((index, traceback.format_exc(), None))


async def _churn_stream(client: AsyncRedis, text: str, rng: random.Random, ops: int, tag: str) -> list[Row]:
    """Checks, releases and reports of steps that every stream shares, on a clock that runs 250 ms per operation
    while leases last 2 s: reservations lapse all the time, and whichever stream comes first ends their hold."""
    now = [FIXED_NOW_MS]
    limiter = make_limiter(client, text, lambda: now[0])
    rows: list[Row] = []
    for op in range(ops):
        now[0] = FIXED_NOW_MS + op * 250
        # Every stream works on a sliding set of the same steps: a reported step is done, fresh ones keep coming.
        step_id = f"shared-{op // 3 + rng.randrange(CHURN_STEPS)}"
        kind = rng.choices(["check", "release", "report"], weights=[5, 2, 3])[0]
        if kind == "check":
            # A step is always checked with the same request (another one would be refused while the step holds).
            request = check_input("task-1", step_id, 1 + int(step_id.split("-")[1]) * 37 % MAX_STEP)
            result = await limiter.check(replace(request, lease_seconds=2))
            rows.append(
                {
                    "kind": kind,
                    "step": step_id,
                    "decision": int(result.verdict.decision),
                    "granted": result.verdict.granted,
                    "replayed": result.replayed,
                }
            )
        elif kind == "release":
            status, amount = await limiter.release(TENANT, reservation_id("task-1", step_id))
            rows.append({"kind": kind, "step": step_id, "status": status, "amount": amount})
        else:
            key = "" if rng.random() < 0.5 else f"{tag}-{op}"
            record = UsageInput(
                tenant_id=TENANT,
                reservation_id="",
                task_id="task-1",
                step_id=step_id,
                task_type="",
                model="m",
                input_tokens=rng.randint(0, MAX_STEP + 100),
                output_tokens=0,
                cached_input_tokens=0,
                tool_calls=0,
                outcome=Outcome.COMPLETED,
                idempotency_key=key,
                timestamp_ms=None,
            )
            try:
                (applied,) = await limiter.report([record])
            except IdempotencyConflictError:
                # Another stream reported this step first without a key, with other figures: refused, nothing applied.
                rows.append({"kind": kind, "step": step_id, "status": 0, "charged": 0, "refunded": 0, "overage": 0})
                continue
            rows.append(
                {
                    "kind": kind,
                    "step": step_id,
                    "status": int(applied.status),
                    "charged": applied.charged,
                    "refunded": applied.refunded,
                    "overage": applied.overage,
                }
            )
    return rows


async def _churn(url: str, text: str, seed: int, streams: int, ops: int, barrier: Any) -> list[Row]:
    client = AsyncRedis.from_url(url)
    try:
        await make_limiter(client, text, FIXED_NOW_MS).budget(TENANT, "warm-up", "")
        await asyncio.to_thread(barrier.wait, BARRIER_TIMEOUT_S)
        runs = [_churn_stream(client, text, random.Random(seed * 100 + s), ops, f"{seed}.{s}") for s in range(streams)]
        return [row for rows in await asyncio.gather(*runs) for row in rows]
    finally:
        await client.aclose()


def churn_worker(index: int, results: Any, barrier: Any, url: str, text: str, streams: int, ops: int) -> None:
    try:
        results.put((index, None, asyncio.run(_churn(url, text, index, streams, ops, barrier))))
    except BaseException:
        barrier.abort()
        results.put((index, traceback.format_exc(), None))


# ---------------------------------------------------------------------------------------------------------------
# Reading the store back.


def read_budget(url: str, text: str, now_ms: int, task_id: str) -> tuple[dict[str, Counter], int, bool]:
    """Each scope's counter by name, the task's active reservations, and whether the task is known."""

    async def read() -> BudgetView:
        client = AsyncRedis.from_url(url)
        try:
            return await make_limiter(client, text, now_ms).budget(TENANT, task_id, "")
        finally:
            await client.aclose()

    view = asyncio.run(read())
    counters = {scope.name: counter for scope, counter in view.scopes}
    return counters, view.state.active_reservations, view.state.task_known


def grpc_budget(addr: str, task_id: str) -> tuple[dict[str, pb.ScopeState], pb.GetBudgetResponse]:
    with BudgetClient(addr) as client:
        answer = client.get_budget(tenant_id=TENANT, task_id=task_id)
    return {scope.name: scope for scope in answer.scopes}, answer


def reservation_records(sync_redis: redis.Redis) -> tuple[set[str], set[str]]:
    """The reservation ids with a record in Redis, and those holding a lease."""
    keys = TenantKeys(TENANT)
    records = {key.decode().removeprefix(keys.resv_prefix) for key in sync_redis.scan_iter(match="*:resv:*")}
    leased = {member.decode() for member in sync_redis.zrange(keys.leases, 0, -1)}
    return records, leased


def random_jobs(task_ids: Sequence[str], count: int, seed: int, prefix: str) -> list[Job]:
    rng = random.Random(seed)
    return [(task_ids[i % len(task_ids)], f"{prefix}-{i}", rng.randint(1, MAX_STEP)) for i in range(count)]


def assert_ceiling_reached(rows: Sequence[Row], ceiling: int, denial: Reason, binding: str) -> int:
    """Total granted fits the ceiling, and every denied step was denied because it did not fit what was left."""
    granted = [row for row in rows if row["decision"] == Decision.ALLOW]
    denied = [row for row in rows if row["decision"] != Decision.ALLOW]
    assert not [row for row in rows if row["fail_mode"]], "no answer may come from the fail mode"
    assert all(row["granted"] == row["tokens"] and not row["replayed"] for row in granted)
    assert all(row["granted"] == 0 and row["rid"] == "" for row in denied)
    total = sum(row["granted"] for row in granted)
    assert total <= ceiling
    assert denied, "demand must exceed the ceiling for this test to mean anything"
    assert {(row["decision"], row["reason"], row["binding"]) for row in denied} == {(Decision.DENY, denial, binding)}
    # Room only shrinks, so every denied step was larger than the room left at the end: within one step of it.
    smallest_denied = min(row["tokens"] for row in denied)
    assert ceiling - total < smallest_denied
    assert total > ceiling - MAX_STEP
    return total


def assert_one_reservation_per_granted_step(rows: Sequence[Row], sync_redis: redis.Redis) -> None:
    granted = [row for row in rows if row["decision"] == Decision.ALLOW]
    rids = [row["rid"] for row in granted]
    assert len(set(rids)) == len(rids), "a reservation id was handed out twice"
    assert all(row["rid"] == reservation_id(row["task"], row["step"]) for row in granted)
    records, leased = reservation_records(sync_redis)
    assert records == set(rids), "Redis holds reservation records that no granted answer accounts for (or misses some)"
    assert leased == set(rids)


# ---------------------------------------------------------------------------------------------------------------
# Tests.


def test_task_ceiling_holds_under_checks_from_many_processes(redis_url: str, sync_redis: redis.Redis) -> None:
    ceiling, day, month = 10_000, 40_000, 60_000
    text = policy_text(task=ceiling, step=MAX_STEP, day=day, month=month)
    per_process = [
        (redis_url, text, FIXED_NOW_MS, [random_jobs(["task-1"], 60, seed=p, prefix=f"p{p}")], 16)
        for p in range(PROCESSES)
    ]
    rows = [row for rounds in run_processes(limiter_worker, per_process, PROCESSES) for row in rounds[0]]
    assert len(rows) == PROCESSES * 60
    assert sum(row["tokens"] for row in rows) > 2 * ceiling

    total = assert_ceiling_reached(rows, ceiling, Reason.TASK_BUDGET_EXHAUSTED, "task")
    counters, active, known = read_budget(redis_url, text, FIXED_NOW_MS, "task-1")
    assert known
    assert counters["task"] == Counter(limit=ceiling, used=0, reserved=total)
    assert counters["tenant.day"] == Counter(limit=day, used=0, reserved=total)
    assert counters["tenant.month"] == Counter(limit=month, used=0, reserved=total)
    assert active == sum(1 for row in rows if row["decision"] == Decision.ALLOW)
    assert_one_reservation_per_granted_step(rows, sync_redis)


def test_tenant_window_binds_when_two_tasks_contend(redis_url: str, sync_redis: redis.Redis) -> None:
    # Each task alone could take 20,000 tokens; the tenant's day holds 12,000 for both together.
    task_ceiling, day = 20_000, 12_000
    text = policy_text(task=task_ceiling, step=MAX_STEP, day=day)
    tasks = ["task-a", "task-b"]
    per_process = [
        (redis_url, text, FIXED_NOW_MS, [random_jobs(tasks, 60, seed=100 + p, prefix=f"p{p}")], 16)
        for p in range(PROCESSES)
    ]
    rows = [row for rounds in run_processes(limiter_worker, per_process, PROCESSES) for row in rounds[0]]
    assert sum(row["tokens"] for row in rows) > 2 * day

    total = assert_ceiling_reached(rows, day, Reason.TENANT_WINDOW_EXHAUSTED, "tenant.day")
    per_task = {task: sum(row["granted"] for row in rows if row["task"] == task) for task in tasks}
    assert sum(per_task.values()) == total
    assert all(per_task[task] > 0 for task in tasks), "both tasks must have had a share of the window"
    for task in tasks:
        counters, active, _ = read_budget(redis_url, text, FIXED_NOW_MS, task)
        assert counters["task"] == Counter(limit=task_ceiling, used=0, reserved=per_task[task])
        assert counters["tenant.day"] == Counter(limit=day, used=0, reserved=total)
        assert active == sum(1 for row in rows if row["task"] == task and row["decision"] == Decision.ALLOW)
    assert_one_reservation_per_granted_step(rows, sync_redis)


def test_same_step_checked_concurrently_reserves_once(redis_url: str, sync_redis: redis.Redis) -> None:
    ceiling = 1_000_000
    text = policy_text(task=ceiling, step=MAX_STEP, day=ceiling)
    copies = 6  # concurrent checks of the same step per process, per round
    rng = random.Random(7)
    rounds = [[("task-1", f"step-{r}", rng.randint(1, MAX_STEP))] * copies for r in range(25)]
    per_process = [(redis_url, text, FIXED_NOW_MS, rounds, copies) for _ in range(PROCESSES)]
    outputs = run_processes(limiter_worker, per_process, PROCESSES)

    for r, jobs in enumerate(rounds):
        _, step_id, tokens = jobs[0]
        answers = [row for output in outputs for row in output[r]]
        assert len(answers) == PROCESSES * copies
        assert {row["decision"] for row in answers} == {Decision.ALLOW}
        assert {row["granted"] for row in answers} == {tokens}
        assert {row["rid"] for row in answers} == {reservation_id("task-1", step_id)}
        assert len({row["lease"] for row in answers}) == 1
        assert Tally(row["replayed"] for row in answers) == {False: 1, True: len(answers) - 1}, step_id

    expected = sum(jobs[0][2] for jobs in rounds)
    counters, active, _ = read_budget(redis_url, text, FIXED_NOW_MS, "task-1")
    assert counters["task"] == Counter(limit=ceiling, used=0, reserved=expected)
    assert counters["tenant.day"] == Counter(limit=ceiling, used=0, reserved=expected)
    assert active == len(rounds)
    records, leased = reservation_records(sync_redis)
    assert records == leased == {reservation_id("task-1", jobs[0][1]) for jobs in rounds}


def test_releases_reports_and_lapsing_leases_race_without_losing_a_token(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    # Ceilings high enough that nothing is denied: this test is about every hold ending exactly once.
    text = policy_text(task=10_000_000, step=MAX_STEP, day=10_000_000)
    ops = 150
    per_process = [(redis_url, text, 3, ops) for _ in range(PROCESSES)]
    rows = [row for out in run_processes(churn_worker, per_process, PROCESSES) for row in out]

    checks = [row for row in rows if row["kind"] == "check"]
    releases = [row for row in rows if row["kind"] == "release"]
    reports = [row for row in rows if row["kind"] == "report"]
    new_grants = [row for row in checks if not row["replayed"]]
    assert {row["decision"] for row in checks} == {Decision.ALLOW}
    released = [row for row in releases if row["status"] == ReleaseStatus.RELEASED]
    applied = [row for row in reports if row["status"] == ReportStatus.APPLIED]
    # Enough of every outcome happened for the race to mean something.
    assert len(new_grants) > 50
    assert len(released) > 5
    assert len(applied) > 5
    # Which streams meet a lapsed lease or a duplicate first depends on scheduling (under a loaded machine, possibly
    # none): those paths are pinned deterministically in test_lua.py and the state machine, not required here.

    # A hold ends once: by a release, by a report, or by its lease lapsing; never twice, never not at all.
    held_back = sum(row["amount"] for row in released) + sum(
        row["charged"] + row["refunded"] - row["overage"] for row in applied
    )
    assert len(released) + len(applied) <= len(new_grants)
    assert held_back <= sum(row["granted"] for row in new_grants)
    charged = sum(row["charged"] for row in reports if row["status"] != ReportStatus.DUPLICATE)
    assert all(row["charged"] == 0 for row in reports if row["status"] == ReportStatus.DUPLICATE)

    later = FIXED_NOW_MS + 3_600_000  # every lease has lapsed, still the same day
    counters, active, _ = read_budget(redis_url, text, later, "task-1")
    assert counters["task"] == Counter(limit=10_000_000, used=charged, reserved=0)
    assert counters["tenant.day"] == Counter(limit=10_000_000, used=charged, reserved=0)
    assert active == 0
    assert sync_redis.zcard(TenantKeys(TENANT).leases) == 0


def test_checks_and_duplicate_reports_over_grpc_from_many_processes(
    start_sidecar: Any, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    ceiling, day = 10_000, 30_000
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(policy_text(task=ceiling, step=MAX_STEP, day=day, time_zone=noon_zone()))
    sidecar = start_sidecar(policy_file=policy_file, check_deadline_ms=30_000)
    threads = 4

    # Phase 1: checks of distinct steps of one task, from 4 processes x 4 threads.
    per_process = [
        (
            sidecar.addr,
            "check",
            [random_jobs(["task-1"], 12, seed=10 * p + t, prefix=f"p{p}t{t}") for t in range(threads)],
        )
        for p in range(PROCESSES)
    ]
    rows = [row for out in run_processes(grpc_worker, per_process, PROCESSES * threads) for row in out]
    assert len(rows) == PROCESSES * threads * 12
    total = assert_ceiling_reached(rows, ceiling, Reason.TASK_BUDGET_EXHAUSTED, "task")
    granted = [row for row in rows if row["decision"] == Decision.ALLOW]
    assert_one_reservation_per_granted_step(rows, sync_redis)

    scopes, answer = grpc_budget(sidecar.addr, "task-1")
    assert answer.task_known
    assert answer.active_reservations == len(granted)
    for name, limit in (("task", ceiling), ("tenant.day", day)):
        assert (scopes[name].limit_tokens, scopes[name].used_tokens, scopes[name].reserved_tokens) == (limit, 0, total)

    # Phase 2: every granted step is reported twice with one idempotency key, by two different processes at once.
    rng = random.Random(99)
    reports = [("task-1", row["step"], rng.randint(1, row["granted"] + 50), f"usage:{row['step']}") for row in granted]
    per_process = []
    for p in range(PROCESSES):
        # Process p reports the granted steps whose index modulo PROCESSES is p or p-1: each step by two processes.
        mine = [job for i, job in enumerate(reports) if i % PROCESSES in (p, (p - 1) % PROCESSES)]
        per_process.append((sidecar.addr, "report", [mine[t::threads] for t in range(threads)]))
    results = [row for out in run_processes(grpc_worker, per_process, PROCESSES * threads) for row in out]
    assert len(results) == 2 * len(reports)

    tokens_of = {step: tokens for _, step, tokens, _ in reports}
    granted_of = {row["step"]: row["granted"] for row in granted}
    by_step: dict[str, list[Row]] = {}
    for row in results:
        by_step.setdefault(row["step"], []).append(row)
    assert set(by_step) == set(tokens_of)
    for step, pair in by_step.items():
        statuses = sorted(row["status"] for row in pair)
        assert statuses == [ReportStatus.APPLIED, ReportStatus.DUPLICATE], step
        (applied,) = [row for row in pair if row["status"] == ReportStatus.APPLIED]
        used, held = tokens_of[step], granted_of[step]
        assert applied["charged"] == used
        assert applied["refunded"] == max(0, held - used)
        assert applied["overage"] == max(0, used - held)

    used_total = sum(tokens_of.values())
    scopes, answer = grpc_budget(sidecar.addr, "task-1")
    assert answer.active_reservations == 0
    for name in ("task", "tenant.day"):
        assert (scopes[name].used_tokens, scopes[name].reserved_tokens) == (used_total, 0), name
