"""The limiter: joins the pure decision rules to the store, and answers from the fail mode when the store cannot."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.exceptions import RedisClusterException, RedisError

from budgetwarden._decision import TASK_SCOPE, CheckPlan, Planner, decide
from budgetwarden._keys import reservation_id
from budgetwarden._model import CheckInput, Counter, Decision, Reason, Scope, ScopeKind, UsageInput, Verdict
from budgetwarden._policy import LoadedPolicy
from budgetwarden._store import Applied, BudgetState, BudgetStore

log = logging.getLogger("budgetwarden.limiter")

Clock = Callable[[], int]
# Everything that means "the store did not answer"; anything else is a bug and surfaces as one.
StoreErrors = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class CheckResult:
    verdict: Verdict
    requested: int
    reservation_id: str
    lease_expires_ms: int | None
    scopes: tuple[tuple[Scope, Counter], ...]
    replayed: bool = False
    from_fail_mode: bool = False


@dataclass(frozen=True, slots=True)
class BudgetView:
    scopes: tuple[tuple[Scope, Counter], ...]
    state: BudgetState


class StoreUnavailableError(Exception):
    """The store could not answer; the transport maps this to UNAVAILABLE."""


class Limiter:
    def __init__(
        self,
        store: BudgetStore,
        policy: Callable[[], LoadedPolicy],
        *,
        fail_mode: str = "closed",
        check_deadline_s: float = 0.25,
        default_lease_s: int = 600,
        clock: Clock = wall_clock_ms,
    ) -> None:
        self.store = store
        self.policy = policy
        self.fail_mode = fail_mode
        self.check_deadline_s = check_deadline_s
        self.default_lease_s = default_lease_s
        self.clock = clock
        self.planner = Planner()

    async def check(self, request: CheckInput, deadline_s: float | None = None) -> CheckResult:
        now = self.clock()
        plan = self.planner.plan_check(self.policy().policy, request, now)
        if plan.early is not None:
            return CheckResult(plan.early, plan.requested, "", None, ())
        lease_s = request.lease_seconds or plan.lease_seconds or self.default_lease_s
        timeout = self.check_deadline_s if deadline_s is None else min(self.check_deadline_s, deadline_s)
        try:
            reservation = await asyncio.wait_for(
                self.store.reserve(
                    tenant_id=request.tenant_id,
                    task_id=request.task_id,
                    step_id=request.step_id,
                    task_type=plan.task_type,
                    requested=plan.requested,
                    task_limit=plan.task_limit,
                    windows=plan.counted[1:],
                    candidates=plan.candidates,
                    now_ms=now,
                    lease_ms=lease_s * 1000,
                ),
                timeout,
            )
        except StoreErrors as exc:
            return self._fail_mode_answer(request, plan, exc)
        scopes = tuple(zip(plan.counted, reservation.counters, strict=True))
        if plan.step is not None:
            scopes = ((plan.step, Counter(plan.step.limit, 0, 0)), *scopes)
        if reservation.replayed:
            verdict = Verdict(Decision.ALLOW, Reason.WITHIN_BUDGET, reservation.granted, "step was checked before")
            return CheckResult(
                verdict, plan.requested, reservation.reservation_id, reservation.lease_expires_ms, scopes, True
            )
        verdict = decide(plan, reservation.fitted, reservation.counters, now)
        lease = reservation.lease_expires_ms if reservation.status else None
        return CheckResult(verdict, plan.requested, reservation.reservation_id, lease, scopes)

    def _fail_mode_answer(self, request: CheckInput, plan: CheckPlan, exc: BaseException) -> CheckResult:
        log.warning(
            "budget store did not answer; fail mode %s applies",
            self.fail_mode,
            extra={"error": repr(exc), "tenant_id": request.tenant_id},
        )
        if self.fail_mode == "open":
            verdict = Verdict(
                Decision.ALLOW,
                Reason.FAIL_OPEN,
                plan.requested,
                "budget store unavailable: allowed by fail mode 'open'; usage will be reconciled when reported",
            )
            rid = reservation_id(request.task_id, request.step_id)
            return CheckResult(verdict, plan.requested, rid, None, (), from_fail_mode=True)
        verdict = Verdict(
            Decision.DENY, Reason.FAIL_CLOSED, 0, "budget store unavailable: denied by fail mode 'closed'"
        )
        return CheckResult(verdict, plan.requested, "", None, (), from_fail_mode=True)

    async def report(self, records: Sequence[UsageInput]) -> list[Applied]:
        now = self.clock()
        policy = self.policy().policy
        entries = []
        for record in records:
            at = now if record.timestamp_ms is None else min(now, record.timestamp_ms)
            tenant = policy.tenant(record.tenant_id) or policy.default_tenant
            windows = self.planner.window_scopes(tenant, at)
            entries.append((record, record.task_id, windows))
        try:
            return await self.store.report(entries, now)
        except StoreErrors as exc:
            raise StoreUnavailableError(str(exc) or type(exc).__name__) from exc

    async def release(self, tenant_id: str, rid: str) -> tuple[int, int]:
        try:
            status, amount = await self.store.release(tenant_id, rid, self.clock())
        except StoreErrors as exc:
            raise StoreUnavailableError(str(exc) or type(exc).__name__) from exc
        return status, amount

    async def budget(self, tenant_id: str, task_id: str, task_type: str) -> BudgetView:
        now = self.clock()
        policy = self.policy().policy
        tenant = policy.tenant(tenant_id) or policy.default_tenant
        windows = self.planner.window_scopes(tenant, now)
        try:
            state = await self.store.budget(tenant_id, task_id, windows, now)
        except StoreErrors as exc:
            raise StoreUnavailableError(str(exc) or type(exc).__name__) from exc
        task_counter = state.counters[0]
        scopes: tuple[tuple[Scope, Counter], ...] = tuple(zip(windows, state.counters[1:], strict=True))
        if task_id:
            scopes = ((Scope(TASK_SCOPE, ScopeKind.TASK, task_counter.limit), task_counter), *scopes)
        return BudgetView(scopes, state)
