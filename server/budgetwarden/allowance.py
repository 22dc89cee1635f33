"""A local allowance (docs/local-allowance.md; off unless ``--local-allowance``): the sidecar takes a slice of a task's
budget in one atomic store call, decides the following checks of that task from it without the store, records the
steps it granted in Redis when it settles (before a report of them, on a timer, on shutdown) and hands back what is
unused (idle, shutdown, or when a check does not fit it). Redis counts the whole slice as reserved, so what is
granted locally never passes a ceiling; a slice has a lease, so a dead sidecar's slice comes back by itself."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from redis.exceptions import RedisClusterException, RedisError

from budgetwarden.domain import (
    Candidate,
    CheckInput,
    CheckPlan,
    Counter,
    Scope,
    SliceLeft,
    StoreOutcome,
    StoreStatus,
    Thresholds,
    Verdict,
    WindowSpan,
    decide,
    local_candidate,
)
from budgetwarden.store import (
    AllowanceStore,
    Settled,
    SettledStep,
    SettleStatus,
    candidate_part,
    common_part,
    fingerprint,
    reservation_id,
    slice_id,
)

log = logging.getLogger("budgetwarden.allowance")

_STORE_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)
_NOT_CHECKED_YET = 0  # lua/allowance.lua's take: the task's first check has not fixed its ceiling yet
# Steps per settle call, as checks and reports go to Redis: a slice settled once per sweep holds every step it granted
# since the last one (thousands at a few thousand checks/s), and one call of them all held the event loop while redis-py
# packed them (about 9 µs a step) and Valkey while the script ran (tens of ms).
SETTLE_BATCH = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class AllowanceSettings:
    """How big a slice is (min(cap, share of what is left)) and how long it is held."""

    cap_tokens: int = 50_000
    cap_usd: int | None = None  # micro-USD; None: only the share bounds a cost slice
    share_bp: int = 1_000  # 10% of what is left
    # A slice's lease runs this much beyond the longest step lease granted from it; settling renews it.
    lease_margin_ms: int = 60_000
    # A slice not used for this long is settled and handed back; a take refused for room is not retried sooner.
    idle_ms: int = 5_000
    # Who holds the slices: unique per process, so that a restarted sidecar never mistakes an old slice for its own.
    holder: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(slots=True, kw_only=True)  # not frozen: made per local check, and a frozen __init__ costs ~4x
class LocalDecision:
    """A check decided from a slice: what it answers (the limiter makes the CheckResult of it)."""

    verdict: Verdict
    reservation_id: str
    lease_expires_ms: int
    counters: tuple[Counter, ...]
    thresholds: Thresholds
    replayed: bool = False


class LocalConflict:
    """The step was granted from this slice for a different request (the limiter's StepConflictError)."""


class LocalMiss:
    """No slice can decide the check without a store call first."""


CONFLICT = LocalConflict()
MISS = LocalMiss()


@dataclass(slots=True, kw_only=True)
class _Held:
    tenant_id: str
    task_id: str
    slice_ref: str  # its record's id (store.slice_id)
    windows: tuple[WindowSpan | None, ...]
    window_scopes: tuple[Scope, ...]  # the scopes ``windows`` came from (the planner's cached objects)
    policy_version: str
    left: SliceLeft
    lease_until_ms: int
    step_lease_ms: int
    thresholds: Thresholds
    counters: tuple[Counter, ...]
    outcome: StoreOutcome  # what a grant from the slice decides from: the same for every grant (decide reads it only)
    last_used_ms: int
    pending: list[SettledStep] = field(default_factory=list)
    steps: dict[str, tuple[str, LocalDecision]] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


Key = tuple[str, str]  # (tenant, task)


class Allowances:
    """The slices one sidecar holds, one per task at most. Local decisions run on the event loop without awaiting, so
    they never interleave with each other; store calls swap what they send out first and put it back on failure."""

    def __init__(self, store: AllowanceStore, settings: AllowanceSettings | None = None) -> None:
        self.store = store
        self.settings = settings or AllowanceSettings()
        self._held: dict[Key, _Held] = {}
        self._taking: dict[Key, asyncio.Future[None]] = {}
        self._refused: dict[Key, int] = {}  # no take before this time (ms)
        self._pending_rids: dict[tuple[str, str], Key] = {}  # (tenant, reservation id) -> the slice it came from
        self._dropping: dict[Key, _Held] = {}  # slices being settled and handed back
        # What was decided where, for the benchmark and the metrics of a later change.
        self.local_checks = 0
        self.takes = 0
        self._slices_taken = 0  # numbers the slices' records

    def holds(self, tenant_id: str, task_id: str) -> bool:
        """Whether this sidecar holds a slice for the task (a check of it may be decided locally)."""
        return (tenant_id, task_id) in self._held

    def held(self) -> dict[Key, SliceLeft]:
        """What each held slice has left (for tests and the benchmark's stranded budget)."""
        return {key: held.left for key, held in self._held.items()}

    def decide_now(
        self,
        request: CheckInput,
        plan: CheckPlan,
        *,
        policy_version: str,
        lease_ms: int,
        now_ms: int,
        label: Callable[[Candidate], str],
    ) -> LocalDecision | LocalConflict | LocalMiss | None:
        """The check decided from the slice the sidecar holds for its task, without awaiting anything; MISS when a
        store call (a take, or a hand-back first) could still let ``decide`` decide it; None: the store decides.

        ``lease_ms`` is the lease the store would give the step. The step as asked must fit what the slice has left,
        under the same windows and policy, and its lease must end before the slice's (so a dead holder's slice never
        comes back while a step granted from it still holds)."""
        held = self._held.get((request.tenant_id, request.task_id))
        if held is not None:
            known = held.steps.get(request.step_id)
            if known is not None:
                first_fp, decision = known
                if first_fp != fingerprint(request, plan.shape):
                    return CONFLICT
                return replace(decision, replayed=True)
        if plan.early is not None or not plan.candidates or plan.candidates[0].rung is not None:
            return None  # never local: said without the store, or degraded by a per-step cap
        if held is not None and self._serves(held, plan, policy_version, lease_ms, now_ms):
            return self._grant(held, request, plan, lease_ms, now_ms, label)
        return MISS

    async def decide(
        self,
        request: CheckInput,
        plan: CheckPlan,
        *,
        policy_version: str,
        lease_ms: int,
        now_ms: int,
        label: Callable[[Candidate], str],
    ) -> LocalDecision | LocalConflict | None:
        """``decide_now``, and on a miss: hand back the slice that cannot serve the check, take a new one, and decide
        from it; None: the store decides (with no slice of this sidecar in the way)."""
        now = self.decide_now(
            request, plan, policy_version=policy_version, lease_ms=lease_ms, now_ms=now_ms, label=label
        )
        if now is not MISS:
            return now  # type: ignore[return-value]
        key = (request.tenant_id, request.task_id)
        if key in self._held:
            await self._drop(key, now_ms)
        if not await self._take(key, request, plan, policy_version, lease_ms, now_ms):
            return None
        after = self.decide_now(
            request, plan, policy_version=policy_version, lease_ms=lease_ms, now_ms=now_ms, label=label
        )
        return None if after is MISS else after  # type: ignore[return-value]

    def _serves(self, held: _Held, plan: CheckPlan, policy_version: str, lease_ms: int, now_ms: int) -> bool:
        windows = plan.counted[1:]
        return (
            held.policy_version == policy_version
            # The same windows: nearly always the very scope objects of the take (equal scopes have equal spans).
            and (windows == held.window_scopes or held.windows == tuple([scope.span for scope in windows]))
            and now_ms + lease_ms <= held.lease_until_ms
            and local_candidate(plan, held.left) is not None
        )

    def _grant(
        self,
        held: _Held,
        request: CheckInput,
        plan: CheckPlan,
        lease_ms: int,
        now_ms: int,
        label: Callable[[Candidate], str],
    ) -> LocalDecision:
        candidate = plan.candidates[0]
        held.left.take(candidate.amount)
        held.last_used_ms = now_ms
        rid = reservation_id(request.task_id, request.step_id)
        lease_until = now_ms + lease_ms
        decision = LocalDecision(
            verdict=decide(plan, held.outcome, now_ms),
            reservation_id=rid,
            lease_expires_ms=lease_until,
            counters=held.counters,
            thresholds=held.thresholds,
        )
        step_fp = fingerprint(request, plan.shape)
        held.steps[request.step_id] = (step_fp, decision)
        held.pending.append(
            SettledStep(
                step_id=request.step_id,
                reservation_id=rid,
                lease_until_ms=lease_until,
                amount=candidate.amount,
                fingerprint=step_fp,
                answer=common_part(plan) + "\x1e" + candidate_part(candidate),
                label=label(candidate),
            )
        )
        self._pending_rids[(request.tenant_id, rid)] = (request.tenant_id, request.task_id)
        self.local_checks += 1
        return decision

    async def _take(
        self, key: Key, request: CheckInput, plan: CheckPlan, policy_version: str, lease_ms: int, now_ms: int
    ) -> bool:
        """Take a slice for the task (one take per task at a time: a concurrent check waits for it)."""
        taking = self._taking.get(key)
        if taking is not None:
            await asyncio.shield(taking)
            return key in self._held
        if key in self._held:
            return True  # taken by a concurrent check meanwhile: one slice per task
        if self._refused.get(key, 0) > now_ms:
            return False
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._taking[key] = future
        try:
            settings = self.settings
            lease_until = now_ms + lease_ms + settings.lease_margin_ms
            self._slices_taken += 1
            slice_ref = slice_id(settings.holder, request.task_id, self._slices_taken)
            try:
                taken = await self.store.take(
                    request.tenant_id,
                    request.task_id,
                    slice_ref,
                    plan.counted[1:],
                    cap_tokens=settings.cap_tokens,
                    cap_usd=settings.cap_usd,
                    share_bp=settings.share_bp,
                    wanted=plan.candidates[0].amount,
                    lease_until_ms=lease_until,
                    now_ms=now_ms,
                )
            except _STORE_ERRORS as exc:
                log.warning("allowance: no slice taken: %r", exc, extra={"tenant_id": request.tenant_id})
                return False
            self.takes += 1
            if not taken.taken:
                if taken.status == _NOT_CHECKED_YET:
                    return False  # its first check, in the store, fixes its ceiling: the next check may take
                # Closed, at a checkpoint, or too little left: the store decides this task's checks for a while.
                self._refused[key] = now_ms + self.settings.idle_ms
                if len(self._refused) > 65_536:  # task ids come from callers: bounded
                    self._refused.clear()
                return False
            self._held[key] = _Held(
                tenant_id=request.tenant_id,
                task_id=request.task_id,
                slice_ref=slice_ref,
                windows=tuple(scope.span for scope in plan.counted[1:]),
                window_scopes=plan.counted[1:],
                policy_version=policy_version,
                left=SliceLeft(taken.tokens, taken.usd),
                lease_until_ms=taken.lease_until_ms,
                step_lease_ms=lease_ms,
                thresholds=taken.thresholds,
                counters=taken.counters,
                outcome=StoreOutcome(
                    status=StoreStatus.RESERVED, fitted=0, counters=taken.counters, thresholds=taken.thresholds
                ),
                last_used_ms=now_ms,
            )
            return True
        finally:
            del self._taking[key]
            future.set_result(None)

    async def _drop(self, key: Key, now_ms: int) -> None:
        """Settle the slice's steps and hand back the rest."""
        held = self._held.pop(key, None)
        if held is None:
            return
        self._dropping[key] = held  # a report of its steps waits for this (settle_for)
        try:
            if not await self._settle(held, now_ms, give_back=True):
                # Never settled: those steps' reports are charged without a reservation, and the slice, holding their
                # tokens, comes back by its lease (never before theirs).
                for step in held.pending:
                    self._pending_rids.pop((held.tenant_id, step.reservation_id), None)
        finally:
            if self._dropping.get(key) is held:
                del self._dropping[key]

    async def _settle(self, held: _Held, now_ms: int, *, give_back: bool) -> bool:
        # One store call per slice at a time, in order: a hand-back must never overtake the settling of steps.
        async with held.lock:
            return await self._settle_locked(held, now_ms, give_back=give_back)

    async def _settle_locked(self, held: _Held, now_ms: int, *, give_back: bool) -> bool:
        """Settle the slice's pending steps in calls of at most SETTLE_BATCH steps, in order; the hand-back, when asked,
        goes with the last call. A call that fails leaves its steps and the ones after it pending (the calls before it
        stand: each moved its steps out of the slice whole)."""
        steps, held.pending = held.pending, []
        lease_until = now_ms + held.step_lease_ms + self.settings.lease_margin_ms
        done = 0
        try:
            while True:
                batch = steps[done : done + SETTLE_BATCH]
                last = done + SETTLE_BATCH >= len(steps)
                settled = await self.store.settle(
                    held.tenant_id,
                    held.task_id,
                    held.slice_ref,
                    batch,
                    give_back=give_back and last,
                    lease_until_ms=lease_until,
                    now_ms=now_ms,
                )
                done += len(batch)
                self._settled(held, batch, settled, give_back=give_back, lease_until=lease_until)
                if last:
                    return True
        except BaseException as exc:  # a cancelled call too: its steps go with the next settle
            held.pending = steps[done:] + held.pending
            if not isinstance(exc, _STORE_ERRORS):
                raise
            log.warning("allowance: slice not settled: %r", exc, extra={"tenant_id": held.tenant_id})
            return False

    def _settled(
        self, held: _Held, steps: list[SettledStep], settled: Settled, *, give_back: bool, lease_until: int
    ) -> None:
        for step, status in zip(steps, settled.steps, strict=True):
            self._pending_rids.pop((held.tenant_id, step.reservation_id), None)
            # A replay or a conflict leaves its tokens in the slice; a step reported elsewhere first spent them.
            if status in (SettleStatus.REPLAYED, SettleStatus.CONFLICT) and not give_back:
                held.left.tokens += step.amount.tokens  # the slice kept them
                if held.left.usd is not None:
                    held.left.usd += step.amount.usd
        if settled.live and not give_back:
            held.lease_until_ms = lease_until
        elif not settled.live and self._held.get((held.tenant_id, held.task_id)) is held:
            self._held.pop((held.tenant_id, held.task_id))  # lapsed meanwhile: the store has it back

    async def settle_for(self, tenant_reservations: Iterable[tuple[str, str]], now_ms: int) -> None:
        """Record in the store the steps granted locally among (tenant, reservation id) pairs, so that a report or a
        release of them finds their reservations (the store knows only what was settled)."""
        keys = {self._pending_rids[pair] for pair in tenant_reservations if pair in self._pending_rids}
        for key in keys:
            held = self._held.get(key) or self._dropping.get(key)
            if held is None:
                continue
            # Behind the slice's lock: a settle already on its way (the timer's, a hand-back) lands first.
            async with held.lock:
                if held.pending and self._held.get(key) is held:
                    await self._settle_locked(held, now_ms, give_back=False)

    async def sweep(self, now_ms: int) -> None:
        """The timer's work: hand back idle slices, settle the others' steps and renew their leases."""
        for key, held in list(self._held.items()):
            if now_ms - held.last_used_ms >= self.settings.idle_ms:
                await self._drop(key, now_ms)
            elif held.pending or held.lease_until_ms - now_ms < self.settings.lease_margin_ms // 2:
                await self._settle(held, now_ms, give_back=False)

    async def close(self, now_ms: int) -> None:
        """On shutdown: settle every slice's steps and hand back the rest."""
        for key in list(self._held):
            await self._drop(key, now_ms)
