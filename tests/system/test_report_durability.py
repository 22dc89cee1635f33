"""Issue 4: no token of real spend may be lost or counted twice.

Usage reports go through real sidecars into a real Redis-compatible server, with duplicates and retries injected on
purpose, across OS processes, across Redis crashes (SIGKILL) and graceful restarts, and across a sidecar's SIGTERM.
Afterwards the task counters, the tenant window counters and the usage event stream must equal the ground truth the
test computed itself: every unique record counted exactly once, in tokens, in micro-USD and as exactly one event.

Two smaller tests pin down what the restart scenario ran into: calls failing right after Redis is back, and the
embedded server's child crashing when it is started from a process with live gRPC threads.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from budgetwarden.store._embedded import EmbeddedError, EmbeddedRedis
from budgetwarden.store._keys import TenantKeys
from budgetwarden.store._usage import UsageEvent, event_id, read_events
from budgetwarden_api.v1 import budget_pb2_grpc as pb_grpc
from budgetwarden_client import BudgetClient, pb

from support import SERVE_DEADLINE_ENV, TEST_RPC_TIMEOUT_S, RunningSidecar, free_port, run_processes, wait_for_exit

pytestmark = pytest.mark.slow

TENANT = "tenant"
MODEL = "m"
# USD per million tokens; in micro-USD per million tokens: 3_000_000, 300_000 and 15_000_000.
INPUT_MICROS_PER_MTOK, CACHED_MICROS_PER_MTOK, OUTPUT_MICROS_PER_MTOK = 3_000_000, 300_000, 15_000_000
# Far beyond anything these tests spend (a few hundred million tokens at most): windows count, they never deny.
HUGE = 10**15
POLICY = f"""\
version: 1
default_tenant:
  time_zone: UTC
  windows:
    day: {{tokens: {HUGE}}}
    month: {{tokens: {HUGE}}}
models:
  {MODEL}: {{input_usd_per_mtok: 3.0, cached_input_usd_per_mtok: 0.3, output_usd_per_mtok: 15.0}}
default_model: {{}}
default_task_type: t
task_types:
  t: {{}}
"""
STREAM_MAX_LEN = 10_000_000
RPC_TIMEOUT_S = 30.0
RESULT_TIMEOUT_S = 150.0
READY_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 120.0
STATUS_NAMES = {pb.REPORT_STATUS_APPLIED: "applied", pb.REPORT_STATUS_UNRESERVED: "unreserved"}


# ---------------------------------------------------------------------------------------------------------------
# Ground truth: a usage record is a pure function of its number, so workers and the test agree without sharing it.


@dataclass(frozen=True, slots=True)
class Spec:
    key: str
    task: str
    step: str
    input: int
    cached: int
    output: int
    # What the step's check asks for (input estimate, max output); None: the step is reported without a check.
    check: tuple[int, int] | None

    @property
    def tokens(self) -> int:
        return self.input + self.output

    @property
    def cost(self) -> int:
        """What the record must charge: each kind of token at its own price, rounded up to the micro-dollar."""
        total = (
            (self.input - self.cached) * INPUT_MICROS_PER_MTOK
            + self.cached * CACHED_MICROS_PER_MTOK
            + self.output * OUTPUT_MICROS_PER_MTOK
        )
        return -(-total // 1_000_000)

    def record(self) -> pb.UsageRecord:
        return pb.UsageRecord(
            tenant_id=TENANT,
            task_id=self.task,
            step_id=self.step,
            model=MODEL,
            input_tokens=self.input,
            cached_input_tokens=self.cached,
            output_tokens=self.output,
            outcome=pb.OUTCOME_COMPLETED,
            idempotency_key=self.key,
        )


def make_spec(prefix: str, i: int, tasks: int, checked: bool) -> Spec:
    input_tokens = 1 + (i * 7919) % 4000
    cached = (i * 104_729) % (input_tokens + 1) if i % 3 == 0 else 0
    output = (i * 31_337) % 2001
    check = None
    if checked:
        # Reserve a little more (refund) or a little less (overage) than the step will spend.
        delta = 250 if i % 2 else -250
        check = (max(1, input_tokens + delta), output)
    return Spec(
        f"{prefix}-{i}", f"{prefix}-task-{i % tasks}", f"{prefix}-step-{i}", input_tokens, cached, output, check
    )


@dataclass
class Truth:
    """What the store must hold for a set of unique records."""

    specs: dict[str, Spec] = field(default_factory=dict)

    def add(self, spec: Spec) -> None:
        assert self.specs.setdefault(spec.key, spec) is spec, f"two records with the key {spec.key}"

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.specs.values())

    @property
    def cost(self) -> int:
        return sum(s.cost for s in self.specs.values())

    def per_task(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = collections.defaultdict(lambda: (0, 0))
        for s in self.specs.values():
            tokens, cost = out[s.task]
            out[s.task] = (tokens + s.tokens, cost + s.cost)
        return dict(out)

    def event_ids(self) -> dict[str, Spec]:
        return {event_id(TENANT, s.key): s for s in self.specs.values()}


# ---------------------------------------------------------------------------------------------------------------
# Reading the store back and comparing it with the truth.


def all_events(url: str) -> list[UsageEvent]:
    client = redis.Redis.from_url(url)
    try:
        return list(read_events(client, TENANT, 0))
    finally:
        client.close()


def window_sums(url: str) -> dict[str, tuple[int, int, int, int]]:
    """(used, reserved, used_usd, reserved_usd) summed over every window key of the tenant, by window kind: a window
    that rolled over during the test has two keys, and together they must hold everything."""
    client = redis.Redis.from_url(url)
    sums: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0, 0])
    try:
        prefix = TenantKeys(TENANT).prefix + "win:"
        for raw in client.scan_iter(match=prefix + "*", count=1000):
            key = raw.decode()
            kind = key.removeprefix(prefix).split(":")[0]
            values = client.hmget(key, "used", "reserved", "used_usd", "reserved_usd")
            for n, value in enumerate(values):
                sums[kind][n] += int(value or 0)
    finally:
        client.close()
    return {kind: (v[0], v[1], v[2], v[3]) for kind, v in sums.items()}


def task_states(addr: str, tasks: Sequence[str]) -> dict[str, tuple[int, int, int, int, int]]:
    """(used, reserved, used_usd, reserved_usd, active reservations) of each task, from GetBudget."""
    out = {}
    with BudgetClient(addr, timeout=RPC_TIMEOUT_S) as client:
        for task in tasks:
            view = client.get_budget(tenant_id=TENANT, task_id=task)
            (scope,) = [s for s in view.scopes if s.name == "task"]
            out[task] = (
                scope.used_tokens,
                scope.reserved_tokens,
                scope.used_usd_micros,
                scope.reserved_usd_micros,
                view.active_reservations,
            )
    return out


def assert_store_matches(addr: str, url: str, truth: Truth) -> list[UsageEvent]:
    """Counters (tasks and windows) and the usage stream hold exactly the truth: every record once, nothing else."""
    per_task = truth.per_task()
    states = task_states(addr, sorted(per_task))
    wrong = {
        task: (state, (tokens, 0, cost, 0, 0))
        for task, state in states.items()
        for tokens, cost in [per_task[task]]
        if state != (tokens, 0, cost, 0, 0)
    }
    assert not wrong, f"task counters (got, expected) as (used, reserved, used_usd, reserved_usd, active): {wrong}"

    windows = window_sums(url)
    assert sorted(windows) == ["day", "month"], windows
    for kind, sums in windows.items():
        assert sums == (truth.tokens, 0, truth.cost, 0), f"{kind} windows (used, reserved, used_usd, reserved_usd)"

    events = all_events(url)
    counts = collections.Counter(e.id for e in events)
    twice = [i for i, n in counts.items() if n > 1]
    assert not twice, f"{len(twice)} events written more than once, e.g. {twice[:3]}"
    expected = truth.event_ids()
    missing = expected.keys() - counts.keys()
    extra = counts.keys() - expected.keys()
    assert not missing, f"{len(missing)} of {len(expected)} records have no usage event, e.g. {sorted(missing)[:3]}"
    assert not extra, f"{len(extra)} usage events of no record sent, e.g. {sorted(extra)[:3]}"
    assert len(events) == len(truth.specs)
    mismatched = []
    for event in events:
        spec = expected[event.id]
        data = event.data
        got = (
            data["idempotency_key"], data["task_id"], data["step_id"], data["input_tokens"],
            data["cached_input_tokens"], data["output_tokens"], data["cost_usd_micros"], data["status"],
        )  # fmt: skip
        status = "applied" if spec.check is not None else "unreserved"
        want = (spec.key, spec.task, spec.step, spec.input, spec.cached, spec.output, spec.cost, status)
        if got != want:
            mismatched.append((got, want))
    assert not mismatched, f"{len(mismatched)} events differ from their record (got, expected): {mismatched[:3]}"
    assert sum(e.data["input_tokens"] + e.data["output_tokens"] for e in events) == truth.tokens
    assert sum(e.data["cost_usd_micros"] for e in events) == truth.cost
    return events


def write_policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def check_step(client: BudgetClient, spec: Spec) -> pb.CheckResponse:
    assert spec.check is not None
    estimate, max_output = spec.check
    return client.check(
        tenant_id=TENANT,
        task_id=spec.task,
        step_id=spec.step,
        model=MODEL,
        estimated_input_tokens=estimate,
        max_output_tokens=max_output,
    )


def stream_messages(records: Sequence[pb.UsageRecord], per_message: int) -> list[pb.ReportStreamRequest]:
    return [pb.ReportStreamRequest(records=records[i : i + per_message]) for i in range(0, len(records), per_message)]


# ---------------------------------------------------------------------------------------------------------------
# 1. 100,000 records from 4 processes, with duplicates within batches, across processes, and resent batches.

RECORDS = 100_000
PROCESSES = 4
TASKS = 40
BATCH = 500


def many_spec(i: int) -> Spec:
    # One record in 50 runs under a reservation taken by a check first; the others are reported without one.
    return make_spec("many", i, TASKS, checked=i % 50 == 7)


def shared_copy(i: int) -> bool:
    """Records that a second process sends too, identically (only unreserved ones: the check is the owner's)."""
    return i % 97 == 3 and many_spec(i).check is None


@dataclass(frozen=True, slots=True)
class Batch:
    numbers: tuple[int, ...]  # record numbers, in order, repeats included
    stream: bool  # sent with ReportStream (5 messages) instead of Report
    resend: str  # "", "now" (again right after the answer, like a retry of a lost answer) or "later"


def worker_plan(worker: int) -> list[Batch]:
    """The batches one process sends: its own records, copies of another process's, repeats and resends."""
    numbers = [i for i in range(RECORDS) if i % PROCESSES == worker]
    numbers += [i for i in range(RECORDS) if i % PROCESSES == (worker + 1) % PROCESSES and shared_copy(i)]
    numbers.sort()
    plan = []
    for b, start in enumerate(range(0, len(numbers), BATCH)):
        chunk = numbers[start : start + BATCH]
        if b % 3 == 0:  # the same record more than once inside one batch, adjacent and far apart
            chunk = [*chunk[:10], chunk[9], *chunk[10:], chunk[0], chunk[len(chunk) // 2]]
        resend = ""
        if b % 10 == 1:
            resend = "now" if (b // 10) % 2 == 0 else "later"
        plan.append(Batch(tuple(chunk), stream=b % 5 == 4, resend=resend))
    return plan


def _send_plan(addr: str, worker: int) -> dict[str, Any]:
    plan = worker_plan(worker)
    tally: collections.Counter[str] = collections.Counter()
    charged = 0
    problems: list[str] = []
    channel = grpc.insecure_channel(addr)
    stub = pb_grpc.BudgetServiceStub(channel)
    with BudgetClient(addr, timeout=RPC_TIMEOUT_S) as client:

        def send(batch: Batch) -> None:
            nonlocal charged
            specs = [many_spec(i) for i in batch.numbers]
            records = [s.record() for s in specs]
            tally["sent"] += len(records)
            if batch.stream:
                tally["streams"] += 1
                answer = stub.ReportStream(iter(stream_messages(records, 100)), timeout=RPC_TIMEOUT_S)
                if answer.records != len(records):
                    problems.append(f"stream acknowledged {answer.records} of {len(records)} records")
                tally["applied"] += answer.applied
                tally["unreserved"] += answer.unreserved
                tally["duplicate"] += answer.duplicate
                return
            tally["reports"] += 1
            results = client.report(records).results
            if len(results) != len(records):
                problems.append(f"report answered {len(results)} results for {len(records)} records")
            for spec, result in zip(specs, results, strict=False):
                if result.status == pb.REPORT_STATUS_DUPLICATE:
                    tally["duplicate"] += 1
                    if result.charged_tokens != 0:
                        problems.append(f"{spec.key}: a duplicate charged {result.charged_tokens}")
                    continue
                tally[STATUS_NAMES.get(result.status, f"status-{result.status}")] += 1
                charged += result.charged_tokens
                if result.charged_tokens != spec.tokens:
                    problems.append(f"{spec.key}: charged {result.charged_tokens}, spent {spec.tokens}")

        later = []
        for batch in plan:
            for i in dict.fromkeys(batch.numbers):
                spec = many_spec(i)
                if spec.check is not None and i % PROCESSES == worker:
                    answer = check_step(client, spec)
                    tally["checks"] += 1
                    if answer.decision != pb.DECISION_ALLOW or answer.granted_tokens != sum(spec.check):
                        problems.append(f"{spec.key}: check answered {answer.decision}/{answer.granted_tokens}")
            send(batch)
            if batch.resend == "now":
                send(batch)
            elif batch.resend == "later":
                later.append(batch)
        for batch in later:
            send(batch)
    channel.close()
    return {"tally": dict(tally), "charged": charged, "problems": problems}


def many_records_worker(index: int, results: Any, barrier: Any, addr: str) -> None:
    try:
        BudgetClient(addr, timeout=TEST_RPC_TIMEOUT_S).close()  # import everything before the start line
        barrier.wait(60)
        results.put((index, None, _send_plan(addr, index)))
    except BaseException:
        barrier.abort()
        results.put((index, traceback.format_exc(), None))


def test_100k_records_from_4_processes_with_duplicates_and_retries_count_exactly_once(
    start_sidecar: Callable[..., RunningSidecar], redis_url: str, tmp_path: Path
) -> None:
    sidecar = start_sidecar(policy_file=write_policy(tmp_path), usage_stream_max_len=STREAM_MAX_LEN)

    truth = Truth()
    for i in range(RECORDS):
        truth.add(many_spec(i))
    plans = [worker_plan(w) for w in range(PROCESSES)]
    planned_sent = sum(len(b.numbers) * (2 if b.resend else 1) for plan in plans for b in plan)
    checked = sum(1 for s in truth.specs.values() if s.check is not None)
    shared = sum(1 for i in range(RECORDS) if shared_copy(i))
    resent = sum(1 for plan in plans for b in plan if b.resend)
    streamed = sum(1 for plan in plans for b in plan if b.stream)
    # The plan really injects every kind of duplicate it claims to.
    assert shared > 500
    assert resent > 10
    assert streamed > 10
    assert checked > 1000
    assert planned_sent > RECORDS + shared + 5000

    outputs = run_processes(many_records_worker, [(sidecar.addr,)] * PROCESSES, timeout=RESULT_TIMEOUT_S)

    problems = [p for out in outputs for p in out["problems"]]
    assert not problems, problems[:10]
    tally: collections.Counter[str] = collections.Counter()
    for out in outputs:
        tally.update(out["tally"])
    assert tally["sent"] == planned_sent
    assert tally["checks"] == checked
    # Per-record outcomes: each unique record applied exactly once (to its reservation if it had one), the rest
    # duplicates. No other status.
    assert tally["applied"] == checked
    assert tally["unreserved"] == RECORDS - checked
    assert tally["duplicate"] == planned_sent - RECORDS
    assert set(tally) <= {"sent", "checks", "applied", "unreserved", "duplicate", "reports", "streams"}, tally

    events = assert_store_matches(sidecar.addr, redis_url, truth)
    print(
        f"\n100k: sent {planned_sent} records ({tally['reports']} reports, {tally['streams']} streams, "
        f"{resent} resent batches, {shared} cross-process copies), unique {RECORDS}, duplicates "
        f"{tally['duplicate']}, checked {checked}; events {len(events)}, tokens {truth.tokens}, "
        f"micro-USD {truth.cost}"
    )


# ---------------------------------------------------------------------------------------------------------------
# 2. Redis killed (SIGKILL) and later stopped (SIGTERM) while reporters run; restarted from its append-only file.

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})


@dataclass
class Reporter:
    """Sends its batches in order; each one again and again (same records, same keys) until it is acknowledged."""

    addr: str
    batches: list[list[Spec]]
    stop_at: float
    abort: threading.Event
    acked: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)
    error: str | None = None

    def run(self) -> None:
        try:
            channel = grpc.insecure_channel(self.addr)
            stub = pb_grpc.BudgetServiceStub(channel)
            with BudgetClient(self.addr, timeout=RPC_TIMEOUT_S) as client:
                for b, batch in enumerate(self.batches):
                    for spec in batch:
                        if spec.check is not None:
                            self._retry(functools.partial(self._check, client, spec))
                    records = [s.record() for s in batch]
                    if b % 4 == 3:
                        self._retry(functools.partial(self._stream, stub, stream_messages(records, 50)))
                    else:
                        self._retry(functools.partial(client.report, records))
                    self.acked += 1
            channel.close()
        except BaseException:
            self.error = traceback.format_exc()

    @staticmethod
    def _stream(stub: pb_grpc.BudgetServiceStub, messages: list[pb.ReportStreamRequest]) -> pb.ReportStreamResponse:
        return stub.ReportStream(iter(messages), timeout=RPC_TIMEOUT_S)

    def _check(self, client: BudgetClient, spec: Spec) -> bool:
        answer = check_step(client, spec)
        if answer.from_fail_mode:  # the store did not answer: nothing is known about the reservation yet
            self.failures["check-fail-mode"] += 1
            return False
        if answer.decision != pb.DECISION_ALLOW:
            self.problems.append(f"{spec.key}: check answered {answer.decision}")
        return True

    def _retry(self, call: Callable[[], Any]) -> None:
        delay = 0.02
        while True:
            try:
                if call() is not False:
                    return
            except grpc.RpcError as exc:
                code = exc.code()
                self.failures[code.name] += 1
                if code not in RETRYABLE:
                    self.problems.append(f"not retryable: {code.name}: {exc.details()}")
            if time.monotonic() > self.stop_at or self.abort.is_set():
                raise AssertionError(f"gave up retrying; failures so far: {dict(self.failures)}")
            time.sleep(delay)
            delay = min(delay * 2, 0.4)


def restart_specs(reporters: int, batches: int, size: int) -> list[list[list[Spec]]]:
    out = []
    n = 0
    for _ in range(reporters):
        mine = []
        for _ in range(batches):
            batch = []
            for _ in range(size):
                batch.append(make_spec("restart", n, 12, checked=n % 20 == 5))
                n += 1
            mine.append(batch)
        out.append(mine)
    return out


@contextlib.contextmanager
def redis_servers() -> Iterator[list[EmbeddedRedis]]:
    """Every server started in the block is stopped at its end, whatever happens."""
    servers: list[EmbeddedRedis] = []
    try:
        yield servers
    finally:
        for server in servers:
            server.kill()


# Children of EmbeddedRedis that died of a signal before they ran the server, by start (see start_redis).
CRASHED_STARTS: list[str] = []


def start_redis(servers: list[EmbeddedRedis], data_dir: Path, port: int) -> EmbeddedRedis:
    """A persistent server on ``port`` and ``data_dir`` (the append-only file of any earlier one is replayed).

    A start whose child dies of a signal before it runs the server is tried again: that is a bug of EmbeddedRedis in a
    process with live gRPC threads (its preexec_fn), shown by
    test_starting_the_embedded_server_beside_live_grpc_never_crashes_it; such a child never opened the data dir."""
    log = data_dir / "redis.log"
    for _ in range(5):
        server = EmbeddedRedis(data_dir, port=port, persistent=True, appendfsync="everysec")
        servers.append(server)
        logged = log.stat().st_size if log.exists() else 0
        try:
            server.start(timeout=30)
        except EmbeddedError as exc:
            # Died of a signal without writing a line: it never got to run the server.
            if not re.search(r"exited with -\d+:", str(exc)) or (log.stat().st_size if log.exists() else 0) != logged:
                raise
            CRASHED_STARTS.append(str(exc)[:40])
            continue
        return server
    raise AssertionError(f"the server crashed at every start: {CRASHED_STARTS}")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def test_reports_survive_redis_sigkill_and_graceful_restart_exactly_once(
    start_sidecar: Callable[..., RunningSidecar], tmp_path: Path
) -> None:
    data_dir = tmp_path / "valkey"
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    plans = restart_specs(reporters=3, batches=40, size=250)
    truth = Truth()
    for plan in plans:
        for batch in plan:
            for spec in batch:
                truth.add(spec)
    total_batches = sum(len(plan) for plan in plans)

    with redis_servers() as servers:
        first = start_redis(servers, data_dir, port)
        assert first.url == url
        sidecar = start_sidecar(redis_url=url, policy_file=write_policy(tmp_path), usage_stream_max_len=STREAM_MAX_LEN)
        abort = threading.Event()
        reporters = [Reporter(sidecar.addr, plan, time.monotonic() + 90, abort) for plan in plans]
        threads = [threading.Thread(target=r.run, daemon=True) for r in reporters]

        def acked() -> int:
            return sum(r.acked for r in reporters)

        def failures() -> int:
            return sum(sum(r.failures.values()) for r in reporters)

        for thread in threads:
            thread.start()
        try:
            # A crash: SIGKILL in the middle of the reports.
            wait_for(lambda: acked() >= total_batches // 4, "a quarter of the batches were acknowledged")
            acked_before_kill = acked()
            first.kill()
            failures_before = failures()
            wait_for(lambda: failures() > failures_before, "a reporter noticed that Redis was gone")
            time.sleep(0.3)
            second = start_redis(servers, data_dir, port)
            assert second.pid != first.pid
            # A graceful stop (SIGTERM) later on.
            wait_for(lambda: acked() >= total_batches // 2, "half of the batches were acknowledged")
            acked_before_stop = acked()
            second.stop()
            failures_before = failures()
            wait_for(lambda: failures() > failures_before, "a reporter noticed that Redis was stopped")
            time.sleep(0.3)
            start_redis(servers, data_dir, port)
        except BaseException:
            abort.set()
            raise
        finally:
            for thread in threads:
                thread.join(100)
        assert not any(thread.is_alive() for thread in threads), "a reporter did not finish"
        errors = [r.error for r in reporters if r.error]
        assert not errors, errors[0]
        problems = [p for r in reporters for p in r.problems]
        assert not problems, problems[:10]
        assert acked() == total_batches
        assert acked_before_kill < total_batches // 2
        assert acked_before_stop < total_batches
        seen = collections.Counter[str]()
        for r in reporters:
            seen.update(r.failures)
        assert set(seen) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED", "check-fail-mode"}, seen

        events = assert_store_matches(sidecar.addr, url, truth)

        # And once more from the append-only file alone: a crash now loses nothing of the final state. (Read through
        # a fresh sidecar: the first call on each pooled connection of the old one fails after a restart, see
        # test_the_first_calls_after_a_redis_restart_reach_the_store.)
        servers[-1].kill()
        start_redis(servers, data_dir, port)
        reader = start_sidecar(redis_url=url, policy_file=write_policy(tmp_path), usage_stream_max_len=STREAM_MAX_LEN)
        replayed = assert_store_matches(reader.addr, url, truth)
        assert [e.stream_id for e in replayed] == [e.stream_id for e in events]
    print(
        f"\nrestarts: {len(truth.specs)} unique records in {total_batches} batches, failed calls retried {dict(seen)}, "
        f"acknowledged before SIGKILL {acked_before_kill}, before SIGTERM {acked_before_stop}; "
        f"server starts retried after a crash of the child: {len(CRASHED_STARTS)}; "
        f"events {len(events)}, tokens {truth.tokens}, micro-USD {truth.cost}"
    )


def test_the_first_calls_after_a_redis_restart_reach_the_store(
    start_sidecar: Callable[..., RunningSidecar], tmp_path: Path
) -> None:
    """Once Redis is back and answering, a report is acknowledged and a check decided by the store, not refused or
    answered from the fail mode because the sidecar reused a connection to the server that is gone."""
    data_dir = tmp_path / "valkey"
    port = free_port()
    with redis_servers() as servers:
        url = start_redis(servers, data_dir, port).url
        sidecar = start_sidecar(redis_url=url, policy_file=write_policy(tmp_path))
        specs = [make_spec("again", i, 2, checked=False) for i in range(64)]
        with BudgetClient(sidecar.addr, timeout=RPC_TIMEOUT_S) as client:

            def warm(records: list[pb.UsageRecord]) -> None:
                for _ in range(20):
                    with contextlib.suppress(grpc.RpcError):
                        client.report(records)
                        return

            for how, done in (("kill", "killed"), ("stop", "stopped")):
                # Several calls at once, so that the sidecar holds several connections to this server.
                threads = [threading.Thread(target=warm, args=([s.record() for s in specs[n::8]],)) for n in range(8)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(30)
                getattr(servers[-1], how)()
                start_redis(servers, data_dir, port)
                outcomes = []
                for n, spec in enumerate(specs[:8]):
                    step = f"{how}-{n}"
                    try:
                        answer = client.check(tenant_id=TENANT, task_id=spec.task, step_id=step, model=MODEL,
                                              estimated_input_tokens=10)  # fmt: skip
                        outcomes.append("fail mode" if answer.from_fail_mode else "store")
                        record = pb.UsageRecord(tenant_id=TENANT, task_id=spec.task, step_id=step, input_tokens=1,
                                                idempotency_key=step)  # fmt: skip
                        client.report([record])
                        outcomes.append("acknowledged")
                    except grpc.RpcError as exc:
                        outcomes.append(exc.code().name)
                assert set(outcomes) == {"store", "acknowledged"}, f"after Redis was {done} and restarted: {outcomes}"


STARTS = 80
# Two busy client threads make the crash most likely (about one start in seven here); with four or more, gRPC skips
# its fork handlers ("Other threads are currently calling into gRPC") and the child survives.
LOADERS = 2


def test_starting_the_embedded_server_beside_live_grpc_never_crashes_it(
    start_sidecar: Callable[..., RunningSidecar], tmp_path: Path
) -> None:
    """Restarting Redis next to a sidecar that serves (as the test above does) must start it every time."""
    sidecar = start_sidecar(policy_file=write_policy(tmp_path))
    stop = threading.Event()
    acknowledged = collections.Counter[int]()

    def load(n: int) -> None:
        with BudgetClient(sidecar.addr, timeout=RPC_TIMEOUT_S) as client:
            for i in range(1_000_000):
                if stop.is_set():
                    return
                record = pb.UsageRecord(tenant_id=TENANT, task_id="load", step_id=f"{n}-{i}", input_tokens=1,
                                        idempotency_key=f"load-{n}-{i}")  # fmt: skip
                client.report([record])
                acknowledged[n] += 1

    threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(LOADERS)]
    crashes = []
    for thread in threads:
        thread.start()
    try:
        for n in range(STARTS):
            server = EmbeddedRedis(tmp_path / f"valkey-{n}", port=free_port(), persistent=False)
            try:
                server.start(timeout=30)
            except EmbeddedError as exc:
                crashes.append(str(exc)[:60])
            finally:
                server.kill()
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert min(acknowledged[n] for n in range(LOADERS)) >= STARTS, f"the sidecar was not busy all along: {acknowledged}"
    assert not crashes, f"{len(crashes)} of {STARTS} starts crashed: {crashes}"


# ---------------------------------------------------------------------------------------------------------------
# 3. The sidecar gets SIGTERM in the middle of a burst of reports.


def clean_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("BUDGETWARDEN_")}


def serving(addr: str) -> bool:
    with grpc.insecure_channel(addr) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


@dataclass
class Sent:
    specs: list[Spec]
    code: grpc.StatusCode
    after_sigterm: bool  # the call ended (or started) after SIGTERM was sent
    in_flight: bool = False  # the call started before SIGTERM and ended after it


def test_sidecar_sigterm_during_a_burst_loses_no_acknowledged_report(
    start_sidecar: Callable[..., RunningSidecar], redis_url: str, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path)
    addr = f"127.0.0.1:{free_port()}"
    stderr_path = tmp_path / "serve.stderr"
    args = ["serve", "--listen", addr, "--redis-url", redis_url, "--policy-file", str(policy)]
    outcomes: list[Sent] = []
    lock = threading.Lock()
    sigterm = threading.Event()
    deadline = time.monotonic() + 60

    problems: list[str] = []

    def worker(n: int) -> None:
        try:
            send_burst(n)
        except BaseException:
            with lock:
                problems.append(traceback.format_exc())

    def send_burst(n: int) -> None:
        errors_after = 0
        channel = grpc.insecure_channel(addr)
        stub = pb_grpc.BudgetServiceStub(channel)
        with BudgetClient(addr, timeout=RPC_TIMEOUT_S) as client:
            for b in range(100_000):
                if errors_after >= 3 or time.monotonic() > deadline:
                    break
                specs = [make_spec(f"burst-w{n}-b{b}", i, 8, checked=False) for i in range(200)]
                records = [s.record() for s in specs]
                after = sigterm.is_set()
                try:
                    if b % 4 == 3:
                        answer = stub.ReportStream(iter(stream_messages(records, 50)), timeout=RPC_TIMEOUT_S)
                        assert (answer.records, answer.unreserved) == (len(records), len(records)), answer
                    else:
                        results = client.report(records).results
                        statuses = {r.status for r in results}
                        assert len(results) == len(records)
                        assert statuses == {pb.REPORT_STATUS_UNRESERVED}, statuses
                except grpc.RpcError as exc:
                    ended = sigterm.is_set()
                    sent = Sent(specs, exc.code(), after or ended, not after and ended)
                    errors_after += sent.after_sigterm
                else:
                    ended = sigterm.is_set()
                    sent = Sent(specs, grpc.StatusCode.OK, after, not after and ended)
                with lock:
                    outcomes.append(sent)
        channel.close()

    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "budgetwarden", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=clean_env() | SERVE_DEADLINE_ENV,
            cwd=tmp_path,
        )
    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(4)]
    try:
        wait_for(lambda: proc.poll() is not None or serving(addr), "serve answered its health check", READY_TIMEOUT_S)
        assert proc.poll() is None, stderr_path.read_text()
        for thread in threads:
            thread.start()

        def ok_batches() -> int:
            with lock:
                return sum(1 for o in outcomes if o.code == grpc.StatusCode.OK)

        wait_for(lambda: ok_batches() >= 40, "40 batches were acknowledged", 30)
        sigterm.set()
        proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(EXIT_TIMEOUT_S + 30)
        assert not any(thread.is_alive() for thread in threads), "a worker did not finish"
        assert not problems, problems[0]
        code = wait_for_exit(proc, EXIT_TIMEOUT_S, lambda: stderr_path.read_text(errors="replace"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = stderr_path.read_text(errors="replace")
    assert code == 0, log
    assert "Traceback" not in log, log

    failed = [o for o in outcomes if o.code != grpc.StatusCode.OK]
    assert not [o for o in failed if not o.after_sigterm], "a report failed before SIGTERM"
    assert failed, "no report failed after SIGTERM: the burst did not outlive the sidecar"
    unexpected = {o.code.name for o in failed} - {"UNAVAILABLE", "CANCELLED"}
    assert not unexpected, unexpected
    acknowledged = Truth()
    sent = Truth()
    for o in outcomes:
        for spec in o.specs:
            sent.add(spec)
            if o.code == grpc.StatusCode.OK:
                acknowledged.add(spec)

    # What is in Redis now: every acknowledged record, each once; nothing that was not sent; counters == stream.
    checker = start_sidecar(policy_file=policy, usage_stream_max_len=STREAM_MAX_LEN)
    events = all_events(redis_url)
    counts = collections.Counter(e.id for e in events)
    assert not [i for i, n in counts.items() if n > 1], "an event was written twice"
    stored = counts.keys()
    lost = acknowledged.event_ids().keys() - stored
    assert not lost, f"{len(lost)} acknowledged records are not in the usage stream, e.g. {sorted(lost)[:3]}"
    assert stored <= sent.event_ids().keys()
    stream_tokens = sum(e.data["input_tokens"] + e.data["output_tokens"] for e in events)
    states = task_states(checker.addr, sorted(sent.per_task()))
    assert sum(s[0] for s in states.values()) == stream_tokens
    assert sum(s[2] for s in states.values()) == sum(e.data["cost_usd_micros"] for e in events)
    assert {kind: sums[0] for kind, sums in window_sums(redis_url).items()} == {
        "day": stream_tokens,
        "month": stream_tokens,
    }
    assert stream_tokens >= acknowledged.tokens
    applied_unacked = len(events) - len(acknowledged.specs)

    # The failed batches sent again (as a client must) complete the picture: everything once, nothing twice.
    resent: collections.Counter[int] = collections.Counter()
    with BudgetClient(checker.addr, timeout=RPC_TIMEOUT_S) as client:
        for o in failed:
            resent.update(r.status for r in client.report([s.record() for s in o.specs]).results)
    # What had been applied without an answer is recognised as such; the rest is applied now.
    assert resent[pb.REPORT_STATUS_DUPLICATE] == applied_unacked
    assert resent[pb.REPORT_STATUS_UNRESERVED] == len(sent.specs) - len(events)
    assert sum(resent.values()) == sum(len(o.specs) for o in failed)
    final = assert_store_matches(checker.addr, redis_url, sent)
    ok = [o for o in outcomes if o.code == grpc.StatusCode.OK]
    print(
        f"\nsigterm: {len(ok)} batches acknowledged ({len(acknowledged.specs)} records, {acknowledged.tokens} tokens), "
        f"{len(failed)} failed after SIGTERM ({collections.Counter(o.code.name for o in failed)}), "
        f"{sum(o.in_flight for o in ok)} calls in flight at SIGTERM answered OK, "
        f"{applied_unacked} records applied but not acknowledged; after resending: events {len(final)}, "
        f"tokens {sent.tokens}"
    )
