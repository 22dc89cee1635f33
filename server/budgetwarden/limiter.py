"""The limiter: joins the pure decision rules to the store, counts prompts, and answers from the fail mode when the
store cannot."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from urllib.parse import quote

from redis.exceptions import RedisClusterException, RedisError

from budgetwarden.allowance import CONFLICT, MISS, Allowances, LocalConflict, LocalDecision, LocalMiss
from budgetwarden.domain import (
    NO_THRESHOLDS,
    Amount,
    Candidate,
    CheckInput,
    CheckPlan,
    Counter,
    CountingPool,
    Decision,
    LoadedPolicy,
    Planner,
    Policy,
    Prompt,
    Reason,
    Scope,
    StoreOutcome,
    StoreStatus,
    Thresholds,
    TokenCount,
    TokenCounter,
    UsageInput,
    Verdict,
    actual_micros,
    decide,
    estimate_prompt,
    granted_as_asked,
    plan_inputs,
    task_scope,
)
from budgetwarden.store import (
    Applied,
    BudgetState,
    BudgetStore,
    CeilingChange,
    CheckpointCursor,
    CheckpointPage,
    Reservation,
    StepCheck,
    UsageEntry,
    candidate_part,
    common_part,
    fail_open_id,
    fingerprint,
    parse_checkpoint_id,
    parse_fail_open_id,
    replayed_answer,
    reservation_id,
)
from budgetwarden.telemetry import ReportedUsage, Telemetry

log = logging.getLogger("budgetwarden.limiter")

Clock = Callable[[], int]
# Everything that means "the store did not answer"; anything else is a bug and surfaces as one.
StoreErrors = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)
# Checks per script call at most: a call holds Redis for its whole length (about 5 ms for 100 checks here), and each
# call gets the check deadline.
SCRIPT_BATCH = 100
# Prompt characters (all of a message's prompts together) counted on the event loop; more go to the counting pool so
# other checks keep flowing. 2,048 characters took tiktoken 0.2 ms (English prose) to 0.7 ms (random punctuation,
# unspaced CJK) here; 4,096 took up to 1.7 ms (docs/benchmarks.md).
INLINE_COUNT_CHARS = 2048
# The share of a check's deadline its prompts may take to count; the store gets the rest. Past it, prompts not counted
# yet are estimated from their length (marked approximate): the check still reserves, within every ceiling, and the
# report corrects the figure. (The fail mode instead would deny, or allow unbounded, a check Redis could decide.)
COUNT_SHARE = 0.5
# Batches of unary checks waiting for the store at once; checks arriving meanwhile gather for the next batch.
BATCH_CALLS_IN_FLIGHT = 1


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    """Anything meaning "the store did not answer" becomes StoreUnavailableError (the transport's UNAVAILABLE)."""
    try:
        yield
    except StoreErrors as exc:
        raise StoreUnavailableError(str(exc) or type(exc).__name__) from exc


@contextlib.asynccontextmanager
async def _store_call(limit_s: float) -> AsyncIterator[None]:
    """A store call that gets ``limit_s`` seconds: one that does not answer in time, or at all, is
    StoreUnavailableError, so a stalled Redis never holds a caller past its deadline."""
    with _unavailable():
        try:
            async with asyncio.timeout(limit_s) as timer:
                yield
        except TimeoutError:
            if not timer.expired():
                raise  # the store's own timeout (redis-py's socket_timeout), mapped by _unavailable
            raise StoreUnavailableError(f"no answer within {limit_s * 1000:.0f} ms") from None


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True, kw_only=True)
class CheckResult:
    verdict: Verdict
    requested: Amount
    reservation_id: str
    lease_expires_ms: int | None
    scopes: tuple[tuple[Scope, Counter], ...]
    replayed: bool = False
    from_fail_mode: bool = False
    policy_version: str = ""
    thresholds: Thresholds = NO_THRESHOLDS
    token_count: TokenCount | None = None
    model_assumed: bool = False
    task_type: str = ""


@dataclass(frozen=True, slots=True)
class BudgetView:
    scopes: tuple[tuple[Scope, Counter], ...]
    state: BudgetState


class StoreUnavailableError(Exception):
    """The store could not answer; the transport maps this to UNAVAILABLE."""


class UnknownCheckpointError(ValueError):
    """Not a checkpoint id this service issues."""


class StepConflictError(Exception):
    """The step holds a reservation made for a different request; the transport's FAILED_PRECONDITION. Its message
    starts with the field (step_id)."""

    def __init__(self, task_id: str, step_id: str) -> None:
        super().__init__(
            f"step_id: step {step_id!r} of task {task_id!r} was already checked with a different request (model, "
            "tokens, tool calls, task type or task ceiling) and holds what that check was granted; use a new "
            "step_id, or Release it first"
        )


class Limiter:
    def __init__(
        self,
        store: BudgetStore,
        policy: Callable[[], LoadedPolicy],
        *,
        fail_mode: str = "closed",
        check_deadline_s: float = 0.25,
        store_deadline_s: float = 1.0,
        default_lease_s: int = 600,
        clock: Clock = wall_clock_ms,
        counter: TokenCounter | None = None,
        counting_pool: CountingPool | None = None,
        telemetry: Telemetry | None = None,
        allowances: Allowances | None = None,
        batch_unary: bool = True,
    ) -> None:
        self.store = store
        self.allowances = allowances  # a local allowance (off: None); see allowance.py
        self.policy = policy
        self.fail_mode = fail_mode
        self.check_deadline_s = check_deadline_s
        self.store_deadline_s = store_deadline_s
        self.default_lease_s = default_lease_s
        self.clock = clock
        self.planner = Planner()
        self.counter = counter or TokenCounter()
        self.counting_pool = counting_pool or CountingPool()
        self.telemetry = telemetry or Telemetry(None)
        self._labels = _PricedLabels(None)
        # Concurrent unary checks without a prompt share store calls (_UnaryBatch).
        self._batch = _UnaryBatch(self) if batch_unary else None

    async def count(self, model: str, prompt: Prompt, limit_s: float | None = None) -> TokenCount:
        """Count a prompt with the model's encoding (see ``count_all``)."""
        limit = self.check_deadline_s if limit_s is None else limit_s
        (counted,) = await self.count_all([model], [prompt], limit, None)
        assert counted is not None
        return counted

    async def count_all(
        self,
        models: Sequence[str],
        prompts: Sequence[Prompt | None],
        limit_s: float,
        load_limit_s: float | None,
    ) -> list[TokenCount | None]:
        """Count each prompt with its model's encoding, never holding the event loop for more than about a
        millisecond: a few prompt characters on the loop, more on the counting pool, waited for at most ``limit_s``.
        A prompt not counted by then, or refused by a full pool, is estimated from its length (approximate).

        An encoding is loaded once per process, on a worker, which took 0.3 to 1.3 s here: that wait is not counted
        against ``limit_s`` (the first prompts would all be estimates), only against ``load_limit_s`` (the caller's
        deadline, if any)."""
        policy = self.policy().policy
        jobs = [
            (i, policy.model(models[i])[0].encoding, prompt) for i, prompt in enumerate(prompts) if prompt is not None
        ]
        counted: list[TokenCount | None] = [None] * len(prompts)
        if not jobs:
            return counted
        if not await self._load_encodings({encoding for _, encoding, _ in jobs}, load_limit_s):
            for i, encoding, prompt in jobs:
                counted[i] = estimate_prompt(prompt, encoding)
            return counted
        chars = sum(prompt.size for _, _, prompt in jobs)
        if chars <= INLINE_COUNT_CHARS:
            for i, encoding, prompt in jobs:
                counted[i] = self.counter.count_prompt(prompt, encoding)
            return counted
        given_up = threading.Event()

        def work() -> None:  # on a worker: each count lands in `counted` as it is done
            for i, encoding, prompt in jobs:
                if given_up.is_set():
                    return
                counted[i] = self.counter.count_prompt(prompt, encoding)

        future = self.counting_pool.submit(work, chars)
        if future is not None:
            try:
                async with asyncio.timeout(limit_s):
                    await asyncio.wrap_future(future)  # cancelled on time-out: dropped if it has not started
            except TimeoutError:
                given_up.set()  # a running worker stops after the prompt it is counting
        answers = list(counted)  # what the worker finishes from now on is not used
        estimated = [i for i, _, _ in jobs if answers[i] is None]
        if estimated:
            log.warning(
                "prompts estimated, not counted: %s",
                "the counting pool is full" if future is None else f"not counted within {limit_s * 1000:.0f} ms",
                extra={"prompts": len(estimated), "chars": chars},
            )
        for i, encoding, prompt in jobs:
            if answers[i] is None:
                answers[i] = estimate_prompt(prompt, encoding)
        return answers

    async def _load_encodings(self, names: set[str], limit_s: float | None) -> bool:
        """Whether every encoding in ``names`` is loaded (loading the missing ones on a worker, within ``limit_s``)."""
        missing = [name for name in names if not self.counter.loaded(name)]
        if not missing:
            return True
        try:
            async with asyncio.timeout(limit_s):
                for name in missing:
                    await asyncio.to_thread(self.counter.encoding, name)
        except TimeoutError:
            log.warning("prompts estimated, not counted: encodings still loading", extra={"encodings": missing})
            return False
        return True

    async def check(
        self, request: CheckInput, deadline_s: float | None = None, prompt: Prompt | None = None
    ) -> CheckResult:
        """Decide one check; raises StepConflictError for a step checked before with a different request."""
        allowances = self.allowances
        if prompt is None and allowances is not None and allowances.holds(request.tenant_id, request.task_id):
            # The local allowance's hot path: a check its task's slice can decide is decided here, at once, without
            # the batching and the store path's lists (a miss goes on below, planned again: a slice ran short).
            started = time.perf_counter()
            local = self._decide_now(request)
            if local is not None:
                if isinstance(local, StepConflictError):
                    raise local
                if self.telemetry.enabled:
                    self._record(request, local, time.perf_counter() - started)
                return local
        if self._batch is not None and prompt is None:
            started = time.perf_counter()
            result = await self._batch.check(request, deadline_s)
            if self.telemetry.enabled and not isinstance(result, StepConflictError):
                self._record(request, result, time.perf_counter() - started)
        else:
            result = (await self.check_many([request], deadline_s, [prompt]))[0]
        if isinstance(result, StepConflictError):
            raise result
        return result

    def _check_timeout(self, deadline_s: float | None) -> float:
        """How long a check may wait for the store: the check deadline, or less if the caller has less."""
        return self.check_deadline_s if deadline_s is None else min(self.check_deadline_s, deadline_s)

    def _late_answer(self, request: CheckInput, limit_s: float) -> CheckResult:
        """The answer to a check whose store call did not answer within ``limit_s``: the fail mode's (or the answer
        the policy gives without the store)."""
        loaded = self.policy()
        plan = self.planner.plan_check(loaded.policy, request, self.clock())
        if plan.early is not None:
            return CheckResult(
                verdict=plan.early,
                requested=plan.requested,
                reservation_id="",
                lease_expires_ms=None,
                scopes=(),
                policy_version=loaded.version,
                model_assumed=plan.model_assumed,
                task_type=plan.task_type,
            )
        late = StoreUnavailableError(f"no answer within {limit_s * 1000:.0f} ms")
        return self._fail_mode_answer(request, plan, late, loaded.version)

    async def check_many(
        self,
        requests: Sequence[CheckInput],
        deadline_s: float | None = None,
        prompts: Sequence[Prompt | None] | None = None,
    ) -> list[CheckResult | StepConflictError]:
        """Decide many checks, in order, in store calls of up to SCRIPT_BATCH checks of one tenant; each is decided
        exactly as ``check`` would decide it after the ones before it (a refusal is in the list, not raised)."""
        started = time.perf_counter()
        results = await self._check_many(requests, deadline_s, prompts or [None] * len(requests))
        if self.telemetry.enabled:
            seconds = time.perf_counter() - started
            for request, result in zip(requests, results, strict=True):
                if not isinstance(result, StepConflictError):  # a refusal is no decision
                    self._record(request, result, seconds)
        return results

    def _record(self, request: CheckInput, result: CheckResult, seconds: float) -> None:
        verdict = result.verdict
        self.telemetry.check(
            tenant_id=request.tenant_id,
            task_type=result.task_type,
            model=request.model,
            decision=verdict.decision.name,
            reason=verdict.reason.name,
            reserved_tokens=verdict.granted if result.lease_expires_ms is not None else 0,
            fail_mode=self.fail_mode if result.from_fail_mode else None,
            seconds=seconds,
            labels=request.labels,
        )

    async def _check_many(
        self, requests: Sequence[CheckInput], deadline_s: float | None, prompts: Sequence[Prompt | None]
    ) -> list[CheckResult | StepConflictError]:
        timeout = self._check_timeout(deadline_s)
        if any(prompt is not None for prompt in prompts):
            # One deadline for the whole check: what counting takes, the store does not get. Loading an encoding (once
            # per process, up to a second or so) is waited for first and bounded only by the caller's deadline: counted
            # against the check deadline, it would leave the store no time and give the first prompts the fail mode.
            models = [request.model for request in requests]
            policy = self.policy().policy
            encodings = {
                policy.model(model)[0].encoding
                for model, prompt in zip(models, prompts, strict=True)
                if prompt is not None
            }
            await self._load_encodings(encodings, deadline_s)
            loop = asyncio.get_running_loop()
            started = loop.time()
            counted = await self.count_all(models, prompts, timeout * COUNT_SHARE, deadline_s)
            timeout = max(0.0, timeout - (loop.time() - started))
        else:
            counted = [None] * len(requests)
        loaded = self.policy()
        policy = loaded.policy
        now = self.clock()
        results: list[CheckResult | StepConflictError | None] = [None] * len(requests)
        plans: list[CheckPlan | None] = [None] * len(requests)
        by_tenant: dict[str, list[int]] = {}
        plan_check = self.planner.plan_check
        # A plan depends on the policy, the clock (the windows) and plan_inputs of the request only, so the checks of
        # one call that agree on them share one plan (plans are not mutated): a CheckStream message's checks mostly do.
        shaped: dict[tuple[object, ...], CheckPlan] = {}
        for i, request in enumerate(requests):
            if counted[i] is not None:
                request = replace(request, input_tokens=counted[i].tokens)  # type: ignore[union-attr]
            shape = plan_inputs(request)
            plan = shaped.get(shape)
            if plan is None:
                plan = shaped[shape] = plan_check(policy, request, now)
            if plan.early is not None:
                results[i] = CheckResult(
                    verdict=plan.early,
                    requested=plan.requested,
                    reservation_id="",
                    lease_expires_ms=None,
                    scopes=(),
                    policy_version=loaded.version,
                    token_count=counted[i],
                    model_assumed=plan.model_assumed,
                    task_type=plan.task_type,
                )
                continue
            if self.allowances is not None:
                # A unary check may make a store call to take a slice (within its deadline: the store path gets what
                # is left); a batch's checks are decided from slices held already, or in the batch's store calls.
                started_local = asyncio.get_running_loop().time()
                local = await self._decide_locally(
                    request, plan, loaded, now, counted[i], timeout if len(requests) == 1 else None
                )
                timeout = max(0.0, timeout - (asyncio.get_running_loop().time() - started_local))
                if local is not None:
                    results[i] = local
                    continue
            plans[i] = plan
            by_tenant.setdefault(request.tenant_id, []).append(i)
        groups = list(by_tenant.items())
        if not groups:  # every check decided already (locally, or without the store): no store call to wait for
            return results  # type: ignore[return-value]
        if len(groups) == 1:
            answers = [await self._reserve_group(groups[0][0], groups[0][1], requests, plans, now, timeout)]
        else:
            answers = list(
                await asyncio.gather(
                    *(self._reserve_group(tenant, indexes, requests, plans, now, timeout) for tenant, indexes in groups)
                )
            )
        made = _MadeOnce()
        for (tenant_id, indexes), answer in zip(groups, answers, strict=True):
            failed = 0
            for i, reservation in zip(indexes, answer, strict=True):
                planned = plans[i]
                assert planned is not None
                if isinstance(reservation, BaseException):
                    if not failed:  # logged once per tenant of the call, not per check (under overload, 100 lines)
                        failed = sum(1 for item in answer if isinstance(item, BaseException))
                        self._log_fail_mode(reservation, tenant_id, failed)
                    results[i] = self._fail_mode_answer(requests[i], planned, reservation, loaded.version, log_it=False)
                elif reservation.status is StoreStatus.CONFLICT:
                    results[i] = StepConflictError(requests[i].task_id, requests[i].step_id)
                else:
                    results[i] = self._finish(planned, reservation, now, loaded.version, counted[i], made)
        return results  # type: ignore[return-value]

    def _decide_now(self, request: CheckInput) -> CheckResult | StepConflictError | None:
        """A unary check (without a prompt) decided from the slice held for its task, without awaiting anything; None:
        the store path decides it (``_check_many``, which may take a slice first)."""
        assert self.allowances is not None
        loaded = self.policy()
        now = self.clock()
        plan = self.planner.plan_check(loaded.policy, request, now)
        if plan.early is not None:
            return None
        policy = loaded.policy
        local = self.allowances.decide_now(
            request,
            plan,
            policy_version=loaded.version,
            lease_ms=self._lease_s(request, plan, policy) * 1000,
            now_ms=now,
            label=self._labels_for(policy).get,
        )
        return None if local is MISS else self._local_answer(request, plan, loaded, None, local)

    def _lease_s(self, request: CheckInput, plan: CheckPlan, policy: Policy) -> int:
        """The step's lease: never shorter than the policy's minimum (a lapsed lease frees its budget before the usage
        is known)."""
        return max(
            request.lease_seconds or plan.lease_seconds or self.default_lease_s, policy.min_lease(plan.task_type)
        )

    async def _decide_locally(
        self,
        request: CheckInput,
        plan: CheckPlan,
        loaded: LoadedPolicy,
        now: int,
        token_count: TokenCount | None,
        limit_s: float | None,
    ) -> CheckResult | StepConflictError | None:
        """A check decided from the task's local allowance, or None (the store decides it). ``limit_s``: how long store
        calls (a take, a hand-back) may take; None: none are made."""
        assert self.allowances is not None
        policy = loaded.policy
        lease_s = self._lease_s(request, plan, policy)
        local = self.allowances.decide_now(
            request,
            plan,
            policy_version=loaded.version,
            lease_ms=lease_s * 1000,
            now_ms=now,
            label=self._labels_for(policy).get,
        )
        if local is MISS and limit_s is None:
            local = None
        elif local is MISS:
            try:
                async with asyncio.timeout(limit_s):
                    local = await self.allowances.decide(
                        request,
                        plan,
                        policy_version=loaded.version,
                        lease_ms=lease_s * 1000,
                        now_ms=now,
                        label=self._labels_for(policy).get,
                    )
            except TimeoutError:
                local = None
        return self._local_answer(request, plan, loaded, token_count, local)

    def _local_answer(
        self,
        request: CheckInput,
        plan: CheckPlan,
        loaded: LoadedPolicy,
        token_count: TokenCount | None,
        local: LocalDecision | LocalConflict | LocalMiss | None,
    ) -> CheckResult | StepConflictError | None:
        """The answer to a check its task's slice decided (``local``); None: the store decides it."""
        if local is None or local is MISS:
            return None
        if local is CONFLICT:
            return StepConflictError(request.task_id, request.step_id)
        assert isinstance(local, LocalDecision)
        scopes = tuple(zip(plan.counted, local.counters, strict=True))
        if plan.step is not None:
            step_counter = Counter(limit=plan.step.limit, used=0, reserved=0, limit_usd=plan.step.limit_usd)
            scopes = ((plan.step, step_counter), *scopes)
        return CheckResult(
            verdict=local.verdict,
            requested=plan.requested,
            reservation_id=local.reservation_id,
            lease_expires_ms=local.lease_expires_ms,
            scopes=scopes,
            replayed=local.replayed,
            policy_version=loaded.version,
            thresholds=local.thresholds,
            token_count=token_count,
            model_assumed=plan.model_assumed,
            task_type=plan.task_type,
        )

    async def _reserve_group(
        self,
        tenant_id: str,
        indexes: Sequence[int],
        requests: Sequence[CheckInput],
        plans: Sequence[CheckPlan | None],
        now: int,
        limit_s: float,
    ) -> Sequence[Reservation | BaseException]:
        """The checks of one tenant, in script calls of at most SCRIPT_BATCH checks, one after another; each call has
        the check deadline. When a call fails, its checks and the ones after it get the fail mode at once."""
        steps = []
        windows: tuple[Scope, ...] = ()
        policy = self.policy().policy
        labels = self._labels_for(policy)
        # What a step sends besides its task and step ids depends on its plan and these fields of its request only:
        # made once per kind of step of the call (the store packs it once too), shared by the steps alike.
        made: dict[tuple[object, ...], tuple[list[tuple[int, int, int, str, str]], int, str, str]] = {}
        for i in indexes:
            request, plan = requests[i], plans[i]
            assert plan is not None
            kind = (id(plan), request.lease_seconds, request.task_type, request.task_ceiling)
            parts = made.get(kind)
            if parts is None:
                candidates = [
                    (c.amount.tokens, c.amount.usd, int(c.bound), labels.get(c), candidate_part(c))
                    for c in plan.candidates
                ]
                lease_ms = self._lease_s(request, plan, policy) * 1000
                parts = made[kind] = (candidates, lease_ms, fingerprint(request, plan.shape), common_part(plan))
            windows = plan.counted[1:]
            steps.append(
                StepCheck(
                    task_id=request.task_id,
                    step_id=request.step_id,
                    task_type=plan.task_type,
                    task=plan.counted[0],
                    thresholds=plan.thresholds,
                    candidates=parts[0],
                    lease_ms=parts[1],
                    fingerprint=parts[2],
                    answer=parts[3],
                )
            )
        answers: list[Reservation | BaseException] = []
        for start in range(0, len(steps), SCRIPT_BATCH):
            chunk = steps[start : start + SCRIPT_BATCH]
            try:
                # asyncio.timeout, not wait_for: no extra task per call (profiled: wait_for was ~4% of a check).
                async with asyncio.timeout(limit_s):
                    # The windows are the tenant's, at one clock reading: the same for every check of the group.
                    answers += await self.store.reserve_many(tenant_id, windows, chunk, now)
            except StoreErrors as exc:
                return answers + [exc] * (len(steps) - start)
        return answers

    def _labels_for(self, policy: Policy) -> _PricedLabels:
        if self._labels.policy is not policy:
            self._labels = _PricedLabels(policy)
        return self._labels

    def _finish(
        self,
        plan: CheckPlan,
        reservation: Reservation,
        now: int,
        version: str,
        token_count: TokenCount | None,
        made: _MadeOnce,
    ) -> CheckResult:
        """``made``: what the checks of one call share, made once per plan (plans are shared by checks alike)."""
        step = plan.step
        if step is None:
            scopes = tuple(zip(plan.counted, reservation.counters, strict=True))
        else:
            first = made.steps.get(id(plan))
            if first is None:
                first = made.steps[id(plan)] = (
                    (step, Counter(limit=step.limit, used=0, reserved=0, limit_usd=step.limit_usd)),
                )
            scopes = (*first, *zip(plan.counted, reservation.counters, strict=True))
        requested = plan.requested
        status = reservation.status
        replayed = status is StoreStatus.REPLAYED
        if replayed:
            # The first check's answer, from what its reservation kept; the scopes show the figures as they are now.
            verdict, requested = replayed_answer(plan, reservation, now)
            lease: int | None = reservation.lease_expires_ms
        else:
            fitted = reservation.fitted
            shared: Verdict | None = None
            if status is StoreStatus.RESERVED and fitted is not None:
                key = (id(plan), fitted)
                if key in made.verdicts:
                    shared = made.verdicts[key]
                else:
                    shared = made.verdicts[key] = granted_as_asked(plan, fitted)
            if shared is None:
                outcome = StoreOutcome(
                    status=status,
                    fitted=fitted,
                    counters=reservation.counters,
                    thresholds=reservation.thresholds,
                    checkpoint_id=reservation.checkpoint_id,
                )
                verdict = decide(plan, outcome, now)
            else:
                verdict = shared
            lease = reservation.lease_expires_ms if status is StoreStatus.RESERVED else None
        return CheckResult(
            verdict=verdict,
            requested=requested,
            reservation_id=reservation.reservation_id,
            lease_expires_ms=lease,
            scopes=scopes,
            replayed=replayed,
            from_fail_mode=False,
            policy_version=version,
            thresholds=reservation.thresholds,
            token_count=token_count,
            model_assumed=plan.model_assumed,
            task_type=plan.task_type,
        )

    def _log_fail_mode(self, exc: BaseException, tenant_id: str, checks: int = 1) -> None:
        log.warning(
            "budget store did not answer; fail mode %s applies",
            self.fail_mode,
            extra={"error": repr(exc), "tenant_id": tenant_id, "checks": checks},
        )

    def _fail_mode_answer(
        self, request: CheckInput, plan: CheckPlan, exc: BaseException, version: str, *, log_it: bool = True
    ) -> CheckResult:
        """The fail mode's answer; ``log_it``: False when the caller logged the store's failure for its checks."""
        if log_it:
            self._log_fail_mode(exc, request.tenant_id)
        requested = plan.requested
        if self.fail_mode == "open":
            verdict = Verdict(
                decision=Decision.ALLOW,
                reason=Reason.FAIL_OPEN,
                granted=requested.tokens,
                message="budget store unavailable: allowed by fail mode 'open'; usage will be reconciled when reported",
                granted_usd=requested.usd,
            )
            # Nothing is stored behind it: the id itself tells the report which task, step and model it was for.
            rid = fail_open_id(request.task_id, request.step_id, request.model, plan.task_type)
            return CheckResult(
                verdict=verdict,
                requested=requested,
                reservation_id=rid,
                lease_expires_ms=None,
                scopes=(),
                from_fail_mode=True,
                policy_version=version,
            )
        verdict = Verdict(
            decision=Decision.DENY,
            reason=Reason.FAIL_CLOSED,
            granted=0,
            message="budget store unavailable: denied by fail mode 'closed'",
        )
        return CheckResult(
            verdict=verdict,
            requested=requested,
            reservation_id="",
            lease_expires_ms=None,
            scopes=(),
            from_fail_mode=True,
            policy_version=version,
        )

    def _store_limit(self, deadline_s: float | None) -> float:
        """How long a call other than a check may wait for the store: the store deadline, or less if the caller has
        less (``deadline_s``: what is left of the caller's deadline, its margin already kept back)."""
        return self.store_deadline_s if deadline_s is None else min(self.store_deadline_s, deadline_s)

    async def report(self, records: Sequence[UsageInput], deadline_s: float | None = None) -> list[Applied]:
        """Apply usage records. A record naming no model is priced by the store at the model its reservation was
        checked for; only one with neither is priced at the policy's default model (``model_assumed``)."""
        now = self.clock()
        policy = self.policy().policy
        entries = []
        for sent in records:
            record = _with_fail_open_grant(sent)
            at = now if record.timestamp_ms is None else min(now, record.timestamp_ms)
            tenant = policy.tenant(record.tenant_id) or policy.default_tenant
            model, _ = policy.model(record.model)
            cost = actual_micros(model, record.input_tokens, record.cached_input_tokens, record.output_tokens)
            windows = self.planner.window_scopes(tenant, at)
            entries.append(
                UsageEntry(
                    record=record, cost_usd=cost, windows=windows, at_ms=at, as_sent=None if record is sent else sent
                )
            )
        async with _store_call(self._store_limit(deadline_s)):
            if self.allowances is not None:  # steps granted locally get their reservations first
                await self.allowances.settle_for(
                    (
                        (
                            entry.record.tenant_id,
                            entry.record.reservation_id or reservation_id(entry.record.task_id, entry.record.step_id),
                        )
                        for entry in entries
                    ),
                    now,
                )
            stored = await self.store.report(entries, now)
        applied = []
        for entry, item in zip(entries, stored, strict=True):
            name = entry.record.model if item.reservation_model is None else item.reservation_model
            applied.append(replace(item, model=name, model_assumed=policy.model(name)[1]))
        if self.telemetry.enabled:
            self.telemetry.reported(
                ReportedUsage(
                    tenant_id=entry.record.tenant_id,
                    task_type=item.task_type,
                    model=item.model,
                    provider=policy.model(item.model)[0].provider,
                    status=item.status.name.lower(),
                    input_tokens=entry.record.input_tokens,
                    cached_input_tokens=entry.record.cached_input_tokens,
                    output_tokens=entry.record.output_tokens,
                    cost_usd_micros=item.charged_usd,
                    refunded_tokens=item.refunded,
                    late=item.late,
                )
                for entry, item in zip(entries, applied, strict=True)
            )
        return applied

    async def release(self, tenant_id: str, rid: str, deadline_s: float | None = None) -> tuple[int, int]:
        async with _store_call(self._store_limit(deadline_s)):
            if self.allowances is not None:  # a step granted locally gets its reservation first
                await self.allowances.settle_for([(tenant_id, rid)], self.clock())
            status, amount = await self.store.release(tenant_id, rid, self.clock())
        return status, amount

    async def budget(self, tenant_id: str, task_id: str, task_type: str, deadline_s: float | None = None) -> BudgetView:
        now = self.clock()
        policy = self.policy().policy
        tenant = policy.tenant(tenant_id) or policy.default_tenant
        windows = self.planner.window_scopes(tenant, now)
        async with _store_call(self._store_limit(deadline_s)):
            state = await self.store.budget(tenant_id, task_id, windows, now)
        task_counter = state.counters[0]
        scopes: tuple[tuple[Scope, Counter], ...] = tuple(zip(windows, state.counters[1:], strict=True))
        if task_id:
            scopes = ((task_scope(task_counter), task_counter), *scopes)
        return BudgetView(scopes, state)

    # --- administration ---------------------------------------------------------------------------------------

    @staticmethod
    def checkpoint_owner(checkpoint: str) -> tuple[str, str]:
        """The (tenant, task) whose keys a checkpoint id addresses: the only ones a decision on it can touch, so the
        tenant an authorisation must be checked against. Raises UnknownCheckpointError."""
        owner = parse_checkpoint_id(checkpoint)
        if owner is None:
            raise UnknownCheckpointError(checkpoint)
        return owner

    async def decide_checkpoint(
        self, checkpoint: str, *, approve: bool, add: Amount, deadline_s: float | None = None, audit: str = ""
    ) -> tuple[int, Counter]:
        tenant_id, task_id = self.checkpoint_owner(checkpoint)
        async with _store_call(self._store_limit(deadline_s)):
            return await self.store.decide_checkpoint(
                tenant_id, task_id, checkpoint, approve=approve, add=add, now_ms=self.clock(), audit=audit
            )

    async def list_checkpoints(
        self,
        tenant_id: str,
        *,
        decided: bool,
        page_size: int,
        after: CheckpointCursor | None,
        deadline_s: float | None = None,
    ) -> CheckpointPage:
        async with _store_call(self._store_limit(deadline_s)):
            return await self.store.list_checkpoints(
                tenant_id, decided=decided, page_size=page_size, after=after, scan_limit=4 * page_size + 100
            )

    async def record_refusal(self, tenant_id: str | None, fields: Mapping[str, str], deadline_s: float | None) -> None:
        """Append a refused admin call to the audit trail (UNAVAILABLE when the store does not answer in time)."""
        async with _store_call(self._store_limit(deadline_s)):
            await self.store.append_audit(tenant_id, fields)

    async def set_ceiling(
        self,
        tenant_id: str,
        task_id: str,
        *,
        add: bool,
        tokens: int | None,
        usd: int | None,
        request_id: str = "",
        deadline_s: float | None = None,
        audit: str = "",
    ) -> CeilingChange:
        async with _store_call(self._store_limit(deadline_s)):
            return await self.store.set_ceiling(
                tenant_id,
                task_id,
                add=add,
                tokens=tokens,
                usd=usd,
                now_ms=self.clock(),
                request_id=request_id,
                audit=audit,
            )

    async def reset_task(
        self, tenant_id: str, task_id: str, deadline_s: float | None = None, *, audit: str = ""
    ) -> bool:
        async with _store_call(self._store_limit(deadline_s)):
            return await self.store.reset_task(tenant_id, task_id, now_ms=self.clock(), audit=audit)


class _MadeOnce:
    """What ``Limiter._finish`` makes once per plan of a ``_check_many`` call, for the checks that share the plan: the
    per-step cap's scope and its empty counter, and the verdicts that depend on the plan and the candidate reserved
    only (``granted_as_asked``; None: the counters matter). Verdicts and counters are not mutated once made."""

    __slots__ = ("steps", "verdicts")

    def __init__(self) -> None:
        self.steps: dict[int, tuple[tuple[Scope, Counter], ...]] = {}
        self.verdicts: dict[tuple[int, int], Verdict | None] = {}


@dataclass(slots=True)
class _Waiting:
    """A unary check waiting to go in the next batch."""

    request: CheckInput
    limit_s: float
    answer: asyncio.Future[CheckResult | StepConflictError]


class _UnaryBatch:
    """Concurrent unary checks decided together, as the checks of one CheckStream message are
    (``Limiter._check_many``: one script call per tenant), so that they share a Redis round trip and a script call as
    gRPC shares its own work. A check that finds no store call of these in flight is decided at once, alone; checks
    that arrive while BATCH_CALLS_IN_FLIGHT calls wait for the store gather, and go in one call when one returns (group
    commit: grpc.aio hands the handlers one RPC per turn of the event loop, so gathering only the checks of one turn
    gathered almost nothing). Each check keeps its own answer: a refusal is its own, and each waits only as long as its
    own deadline allows (then the fail mode answers it, as it would a unary check)."""

    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter
        self._waiting: list[_Waiting] = []
        self._flush_due = False
        self._in_flight = 0
        self._running: set[asyncio.Task[None]] = set()

    async def check(self, request: CheckInput, deadline_s: float | None) -> CheckResult | StepConflictError:
        limiter = self._limiter
        if self._in_flight < BATCH_CALLS_IN_FLIGHT and not self._waiting:
            # Nothing to wait for: decided at once, in the caller's own task, exactly as alone (a serial caller pays
            # nothing for the batching). Checks arriving meanwhile gather for the next call.
            self._in_flight += 1
            try:
                return (await limiter._check_many([request], deadline_s, [None]))[0]
            finally:
                self._call_done()
        limit_s = limiter._check_timeout(deadline_s)
        waiting = _Waiting(request, limit_s, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        self._schedule()
        try:
            async with asyncio.timeout(limit_s) as timer:
                # shield: one caller's deadline or cancellation must not cancel the others' store call
                return await asyncio.shield(waiting.answer)
        except TimeoutError:
            if not timer.expired():
                raise
            waiting.answer.cancel()  # if not sent yet, it is left out of its batch
            return limiter._late_answer(request, limit_s)
        except asyncio.CancelledError:
            waiting.answer.cancel()  # the caller is gone (the server stopping, the client cancelling)
            raise

    def _schedule(self) -> None:
        if not self._flush_due and self._in_flight < BATCH_CALLS_IN_FLIGHT:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)  # after every callback already due in this turn

    def _call_done(self) -> None:
        self._in_flight -= 1
        if self._waiting:
            self._schedule()

    def _flush(self) -> None:
        self._flush_due = False
        batch = [waiting for waiting in self._waiting if not waiting.answer.done()]
        self._waiting = []
        if batch:
            self._in_flight += 1
            task = asyncio.ensure_future(self._decide(batch))
            self._running.add(task)  # held, so that it is not collected while it runs
            task.add_done_callback(self._running.discard)

            def abandon(answer: asyncio.Future[CheckResult | StepConflictError]) -> None:
                # Nobody waits for the call any more: cancelled, as a unary caller's own store call would be.
                if answer.cancelled() and all(waiting.answer.cancelled() for waiting in batch):
                    task.cancel()

            for waiting in batch:
                waiting.answer.add_done_callback(abandon)

    async def _decide(self, batch: list[_Waiting]) -> None:
        # The store call may take as long as the most patient check allows; each check stops waiting at its own.
        limit_s = max(waiting.limit_s for waiting in batch)
        try:
            answers = await self._limiter._check_many([w.request for w in batch], limit_s, [None] * len(batch))
        except Exception as exc:  # a bug: every caller of the batch sees it, as a unary caller would
            for waiting in batch:
                if not waiting.answer.done():
                    waiting.answer.set_exception(exc)
            return
        except BaseException:  # the server stopping
            for waiting in batch:
                waiting.answer.cancel()
            raise
        finally:
            self._call_done()
        for waiting, answer in zip(batch, answers, strict=True):
            if not waiting.answer.done():
                waiting.answer.set_result(answer)


class _PricedLabels:
    """Candidates' labels for the store: the prices and name of the model a candidate runs on, then its decision, so
    that the reservation can price a report that names no model (lua/_lib.lua, candidate_label). Remembered per policy
    (a label costs about as much as the rest of a check to build): the same few models and rungs come back."""

    __slots__ = ("_known", "policy")

    def __init__(self, policy: Policy | None) -> None:
        self.policy = policy
        self._known: dict[tuple[str, str | None], str] = {}

    def get(self, candidate: Candidate) -> str:
        key = (candidate.shape.model, candidate.rung)
        label = self._known.get(key)
        if label is None:
            assert self.policy is not None
            if len(self._known) >= 4096:  # model names come from callers: bounded
                self._known.clear()
            label = self._known[key] = _priced_label(self.policy, *key)
        return label


def _priced_label(policy: Policy, name: str, rung: str | None) -> str:
    model, _ = policy.model(name)
    decision = f"DEGRADE:{rung}" if rung else "ALLOW"
    prices = (model.input_micros_per_mtok, model.cached_input_micros_per_mtok, model.output_micros_per_mtok)
    return f"{prices[0]} {prices[1]} {prices[2]} {quote(name, safe='')} {decision}"


def _with_fail_open_grant(record: UsageInput) -> UsageInput:
    """A record naming a fail-open reservation id goes to the task and step it was granted for, like a keyless
    report of that step, and takes the model and task type the check asked for when it names none."""
    grant = parse_fail_open_id(record.reservation_id)
    if grant is None:
        return record
    return replace(
        record,
        reservation_id="",
        task_id=grant.task_id,
        step_id=grant.step_id,
        model=record.model or grant.model,
        task_type=record.task_type or grant.task_type,
    )


__all__ = [
    "BudgetView",
    "CheckResult",
    "Limiter",
    "StepConflictError",
    "StoreUnavailableError",
    "UnknownCheckpointError",
]
