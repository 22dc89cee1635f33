"""Random sequences of check / report / release / clock moves, against a plain in-memory model of the budget rules.

The model below is written from the rules, not from the code: a task ceiling fixed on the task's first check, a per-step
cap, a tenant day window (UTC), leases that lapse when the clock passes them, idempotent re-checks (the same request
answers what it answered; another request for a step holding a reservation is refused), reports that replace
a reservation by the real figure, duplicate reports applied once, and reports without a live reservation charged anyway.
After every step the model's counters are compared with what the store holds (``Limiter.budget``), and every answer
with the model's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from datetime import time as dtime

import pytest
import redis
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
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
from budgetwarden.limiter import BudgetView, Limiter, StepConflictError
from budgetwarden.store._keys import reservation_id
from budgetwarden.store._store import BudgetStore, IdempotencyConflictError, Retention

TENANT = "acme"
TASKS = ("t1", "t2", "t3")
STEPS = ("s1", "s2", "s3")
ANY_STEP = st.tuples(st.sampled_from(TASKS), st.sampled_from(STEPS))
TASK_LIMIT = 4_000
STEP_CAP = 800
DAY_LIMIT = 4_500  # less than the three tasks' ceilings together, so the window binds too
LEASE_S = 60
GRACE_MS = Retention().window_grace_ms

POLICY = f"""\
default_model: {{}}  # free: the model counts tokens only
version: 1
unknown_tenants: reject
tenants:
  {TENANT}:
    time_zone: UTC
    windows:
      day: {{tokens: {DAY_LIMIT}}}
default_task_type: agent
task_types:
  agent:
    per_task: {{tokens: {TASK_LIMIT}}}
    per_step: {{tokens: {STEP_CAP}}}
    lease_seconds: {LEASE_S}
min_lease_seconds: 1  # callers' short leases as asked: the machine explores lapses
"""


def start_ms() -> int:
    """A realistic time near now: 20:00 UTC today, so that longer runs see the day window roll over."""
    today = datetime.now(UTC).date()
    return int(datetime.combine(today, dtime(20, 0), UTC).timestamp() * 1000)


def utc_day(now_ms: int) -> tuple[str, int]:
    """The UTC day containing ``now_ms``: its label and the end of the day in epoch ms."""
    day = datetime.fromtimestamp(now_ms / 1000, UTC).date()
    end = datetime.combine(day + timedelta(days=1), dtime(0, 0), UTC)
    return day.isoformat(), int(end.timestamp() * 1000)


# ---------------------------------------------------------------------------------------------------------------
# The model.


@dataclass
class TaskState:
    limit: int | None = None  # None: no ceiling fixed yet (the task was only reported against)
    used: int = 0
    reserved: int = 0
    active: int = 0


@dataclass
class WindowState:
    used: int = 0
    reserved: int = 0


@dataclass
class Held:
    task_id: str
    state: str  # reserved, reported, released, expired
    amount: int
    lease_ms: int
    window: str  # the day the step was admitted on
    window_alive_until_ms: int  # after this the window's counter is gone: nothing is added to it any more
    generation: int = 1  # how many times the step was reserved: a keyless report counts once per generation
    request: tuple[int, int | None] = (0, None)  # what it was checked with (amount, ceiling): a re-check must match


@dataclass(frozen=True)
class Expected:
    decision: Decision
    reason: Reason
    granted: int
    binding: str = ""
    reservation_id: str = ""
    lease_ms: int | None = None
    replayed: bool = False
    retry_after_ms: int | None = None


REFUSED = "refused: the step holds a reservation made for another request"


@dataclass
class Model:
    tasks: dict[str, TaskState] = field(default_factory=dict)
    windows: dict[str, WindowState] = field(default_factory=dict)
    steps: dict[tuple[str, str], Held] = field(default_factory=dict)
    # marker -> the tokens of the record that used it (its fingerprint here: the records differ only in tokens)
    idempotency: dict[str, int] = field(default_factory=dict)

    def window(self, label: str) -> WindowState:
        return self.windows.setdefault(label, WindowState())

    def end_hold(self, held: Held, state: str, now: int) -> int:
        task = self.tasks[held.task_id]
        task.reserved -= held.amount
        task.active -= 1
        if held.window_alive_until_ms > now:
            self.window(held.window).reserved -= held.amount
        held.state = state
        return held.amount

    def lapse(self, now: int) -> None:
        """A lease that has run out (expiry at or before now) holds nothing any more."""
        for held in self.steps.values():
            if held.state == "reserved" and held.lease_ms <= now:
                self.end_hold(held, "expired", now)

    def check(
        self, task_id: str, step_id: str, amount: int, ceiling: int | None, lease_s: int, now: int
    ) -> Expected | str:
        self.lapse(now)
        rid = reservation_id(task_id, step_id)
        held = self.steps.get((task_id, step_id))
        if held is not None and held.state in ("reserved", "reported"):
            if held.request != (amount, ceiling):
                return REFUSED
            return Expected(Decision.ALLOW, Reason.WITHIN_BUDGET, held.amount, "", rid, held.lease_ms, True)
        task = self.tasks.setdefault(task_id, TaskState())
        if task.limit is None:
            # The ceiling is fixed by the task's first check; an explicit one never goes above the policy's.
            task.limit = TASK_LIMIT if ceiling is None else min(ceiling, TASK_LIMIT)
        if amount > STEP_CAP:
            return Expected(Decision.DENY, Reason.STEP_CAP_EXCEEDED, 0, "step")
        label, day_end = utc_day(now)
        window = self.window(label)
        if task.used + task.reserved + amount > task.limit:
            return Expected(Decision.DENY, Reason.TASK_BUDGET_EXHAUSTED, 0, "task")
        if window.used + window.reserved + amount > DAY_LIMIT:
            return Expected(
                Decision.DENY, Reason.TENANT_WINDOW_EXHAUSTED, 0, "tenant.day", retry_after_ms=day_end - now
            )
        lease = now + lease_s * 1000
        generation = 1 if held is None else held.generation + 1
        self.steps[(task_id, step_id)] = Held(
            task_id, "reserved", amount, lease, label, day_end + GRACE_MS, generation, (amount, ceiling)
        )
        task.reserved += amount
        task.active += 1
        window.reserved += amount
        return Expected(Decision.ALLOW, Reason.WITHIN_BUDGET, amount, "", rid, lease)

    def release(self, task_id: str, step_id: str, now: int) -> tuple[ReleaseStatus, int]:
        self.lapse(now)
        held = self.steps.get((task_id, step_id))
        if held is None:
            return ReleaseStatus.NOT_FOUND, 0
        if held.state == "released":
            return ReleaseStatus.ALREADY_RELEASED, 0
        if held.state == "reported":
            return ReleaseStatus.ALREADY_REPORTED, 0
        if held.state == "expired":
            return ReleaseStatus.EXPIRED, 0
        return ReleaseStatus.RELEASED, self.end_hold(held, "released", now)

    def report(
        self, task_id: str, step_id: str, tokens: int, key: str, with_task: bool, at: int, now: int
    ) -> tuple[ReportStatus, int, int, int, Counter | None]:
        """Returns status, charged, refunded, overage and the task's counter afterwards (if the task is known).

        A report without an idempotency key is keyed by its reservation and that reservation's generation, so each
        reservation of a step takes one keyless report. A report of a lapsed or released reservation charges the
        usage and marks the step reported: checking it again replays.
        """
        known = self.steps.get((task_id, step_id))
        generation = 0 if known is None else known.generation
        marker = key or f"reservation:{reservation_id(task_id, step_id)}:{generation}"
        if marker in self.idempotency:
            if self.idempotency[marker] != tokens:  # another record under a used key: refused, nothing changes
                raise IdempotencyConflictError(0, not key, partial=False)
            return ReportStatus.DUPLICATE, 0, 0, 0, None
        self.idempotency[marker] = tokens
        self.lapse(now)
        held = self.steps.get((task_id, step_id))
        status, refunded, overage = ReportStatus.UNRESERVED, 0, 0
        task: TaskState | None
        if held is not None:
            if held.state == "reserved":
                self.end_hold(held, "reported", now)
                status = ReportStatus.APPLIED
                refunded, overage = max(0, held.amount - tokens), max(0, tokens - held.amount)
            else:
                held.state = "reported"
            # Real spend is charged to where the step was admitted, whether its reservation is still live or not.
            task = self.tasks[task_id]
            task.used += tokens
            if held.window_alive_until_ms > now:
                self.window(held.window).used += tokens
        else:
            # No reservation: charged to the task (if named) and to the tenant's window of the usage's time.
            task = self.tasks.setdefault(task_id, TaskState()) if with_task else None
            if task is not None:
                task.used += tokens
            label, day_end = utc_day(at)
            if day_end + GRACE_MS > now:
                self.window(label).used += tokens
        counter = None if task is None else Counter(limit=task.limit, used=task.used, reserved=task.reserved)
        return status, tokens, refunded, overage, counter


# ---------------------------------------------------------------------------------------------------------------
# The machine.


def make_machine(url: str) -> type[RuleBasedStateMachine]:
    loaded = parse_policy(POLICY, "test")

    class BudgetMachine(RuleBasedStateMachine):
        checked = Bundle("checked")  # steps that were checked: reports and releases mostly name one of them

        def __init__(self) -> None:
            super().__init__()
            flush = redis.Redis.from_url(url)
            flush.flushall()
            flush.close()
            self.now = start_ms()
            self.serial = 0
            self.model = Model()
            self.loop = asyncio.new_event_loop()
            self.client = AsyncRedis.from_url(url)
            self.limiter = Limiter(
                BudgetStore(self.client), lambda: loaded, check_deadline_s=30.0, clock=self.clock, store_deadline_s=30.0
            )

        def clock(self) -> int:
            return self.now

        def teardown(self) -> None:
            self.loop.run_until_complete(self.client.aclose())
            self.loop.close()

        @rule(
            target=checked,
            step=ANY_STEP,
            amount=st.integers(0, STEP_CAP + 200),
            ceiling=st.one_of(st.none(), st.none(), st.integers(1, TASK_LIMIT + 500)),  # mostly the policy's
            lease_s=st.none() | st.integers(1, 600),
        )
        def check(
            self, step: tuple[str, str], amount: int, ceiling: int | None, lease_s: int | None
        ) -> tuple[str, str]:
            task_id, step_id = step
            request = CheckInput(
                tenant_id=TENANT,
                task_id=task_id,
                step_id=step_id,
                task_type="",
                model="m",
                input_tokens=amount // 3,
                output_tokens=amount - amount // 3,
                tool_calls=0,
                lease_seconds=lease_s,
                task_ceiling=ceiling,
            )
            want = self.model.check(task_id, step_id, amount, ceiling, lease_s or LEASE_S, self.now)
            try:
                result = self.loop.run_until_complete(self.limiter.check(request))
            except StepConflictError:
                event("check: refused (another request)")
                assert want == REFUSED
                return step
            assert isinstance(want, Expected), want
            verdict = result.verdict
            got = Expected(
                verdict.decision,
                verdict.reason,
                verdict.granted,
                verdict.binding_scope,
                result.reservation_id,
                result.lease_expires_ms,
                result.replayed,
                verdict.retry_after_ms,
            )
            event(f"check: {want.decision.name} {want.reason.name}{' (replay)' if want.replayed else ''}")
            assert got == want
            assert not result.from_fail_mode
            assert result.requested.tokens == amount
            task = self.model.tasks[task_id]
            window = self.model.window(utc_day(self.now)[0])
            scopes = [(scope.name, counter) for scope, counter in result.scopes]
            assert scopes == [
                ("step", Counter(limit=STEP_CAP, used=0, reserved=0)),
                ("task", Counter(limit=task.limit, used=task.used, reserved=task.reserved)),
                ("tenant.day", Counter(limit=DAY_LIMIT, used=window.used, reserved=window.reserved)),
            ]
            return step

        @rule(step=checked | ANY_STEP)
        def release(self, step: tuple[str, str]) -> None:
            task_id, step_id = step
            got = self.loop.run_until_complete(self.limiter.release(TENANT, reservation_id(task_id, step_id)))
            want = self.model.release(task_id, step_id, self.now)
            event(f"release: {want[0].name}")
            assert got == want

        @rule(
            step=checked | ANY_STEP,
            tokens=st.integers(0, STEP_CAP + 400),
            key=st.sampled_from(["", "retry", "fresh"]),
            with_task=st.booleans(),
            back_ms=st.none() | st.integers(0, 3 * 3_600_000),
        )
        def report(self, step: tuple[str, str], tokens: int, key: str, with_task: bool, back_ms: int | None) -> None:
            task_id, step_id = step
            rid = reservation_id(task_id, step_id)
            # "" is the default key (one per reservation id); "retry" a key sent again; "fresh" one never seen before.
            self.serial += 1
            idempotency_key = {"": "", "retry": f"{rid}:retry", "fresh": f"{rid}:{self.serial}"}[key]
            at = self.now if back_ms is None else self.now - back_ms
            record = UsageInput(
                tenant_id=TENANT,
                reservation_id="" if with_task else rid,
                task_id=task_id if with_task else "",
                step_id=step_id if with_task else "",
                task_type="",
                model="m",
                input_tokens=tokens - tokens // 4,
                output_tokens=tokens // 4,
                cached_input_tokens=0,
                tool_calls=0,
                outcome=Outcome.COMPLETED,
                idempotency_key=idempotency_key,
                timestamp_ms=None if back_ms is None else at,
            )
            try:
                (applied,) = self.loop.run_until_complete(self.limiter.report([record]))
            except IdempotencyConflictError:
                with pytest.raises(IdempotencyConflictError):
                    self.model.report(task_id, step_id, tokens, idempotency_key, with_task, at, self.now)
                event("report: refused")
                return
            status, charged, refunded, overage, task = self.model.report(
                task_id, step_id, tokens, idempotency_key, with_task, at, self.now
            )
            event(f"report: {status.name}")
            assert (applied.status, applied.reservation_id) == (status, rid)
            assert (applied.charged, applied.refunded, applied.overage) == (charged, refunded, overage)
            assert applied.task == task

        @rule(
            ms=st.one_of(
                st.integers(1, 59_000),  # within a lease
                st.integers(LEASE_S * 1000, 10 * 60_000),  # past a default lease
                st.integers(30 * 60_000, 4 * 3_600_000),  # past the day's end and its grace, in longer runs
            )
        )
        def advance(self, ms: int) -> None:
            if utc_day(self.now) != utc_day(self.now + ms):
                event("advance: the day window rolls over")
            self.now += ms

        async def read_every_task(self) -> list[BudgetView]:
            return list(await asyncio.gather(*(self.limiter.budget(TENANT, task_id, "") for task_id in TASKS)))

        @invariant()
        def counters_match(self) -> None:
            self.model.lapse(self.now)
            window = self.model.windows.get(utc_day(self.now)[0], WindowState())
            # All tasks read at once: each read runs whole and first sweeps every lapsed lease of the tenant, so in
            # whatever order Redis runs them, each sees the same state a read one after another would.
            views = self.loop.run_until_complete(self.read_every_task())
            for task_id, view in zip(TASKS, views, strict=True):
                task = self.model.tasks.get(task_id)
                scopes = [(scope.name, counter) for scope, counter in view.scopes]
                want_task = (
                    Counter(limit=None, used=0, reserved=0)
                    if task is None
                    else Counter(limit=task.limit, used=task.used, reserved=task.reserved)
                )
                assert scopes == [
                    ("task", want_task),
                    ("tenant.day", Counter(limit=DAY_LIMIT, used=window.used, reserved=window.reserved)),
                ], task_id
                assert view.state.task_known == (task is not None), task_id
                assert view.state.active_reservations == (0 if task is None else task.active), task_id

    return BudgetMachine


@pytest.mark.slow
def test_budget_rules_match_the_model(redis_url: str) -> None:
    run_state_machine_as_test(
        make_machine(redis_url),
        settings=settings(
            max_examples=200,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
