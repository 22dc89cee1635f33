"""The step API: ``Budget`` (blocking) and ``AsyncBudget`` (asyncio).

::

    budget = Budget()  # BUDGETWARDEN_ADDR, BUDGETWARDEN_TENANT
    with budget.step("task-42", "plan-1", model="big", messages=messages, max_output_tokens=800) as step:
        reply = llm(model=step.model, messages=step.trim(messages), max_tokens=step.max_tokens)
        step.record_usage(input_tokens=reply.usage.prompt_tokens, output_tokens=reply.usage.completion_tokens)

Entering checks the step (CHECKPOINT and DENY raise); leaving reports the usage through a ``BackgroundReporter`` (or
releases the reservation when the block failed before recording any usage).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, TypedDict, TypeVar, Unpack

import grpc

from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client._client import AsyncBudgetClient, BudgetClient, default_tenant
from budgetwarden_client._messages import Message
from budgetwarden_client._reporter import BackgroundReporter
from budgetwarden_client._step import (
    FailMode,
    Step,
    StepSpec,
    decide,
    is_overloaded,
    is_unreachable,
    outcome_of,
    throttled,
    unreachable,
)
from budgetwarden_client._throttle import AdaptiveThrottle

logger = logging.getLogger("budgetwarden_client.step")

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_DEADLINE = 2.0
"""Seconds a check (with its retries of UNAVAILABLE) may take before the fail mode answers."""


def _tenant(tenant_id: str | None) -> str:
    tenant = tenant_id or default_tenant()
    if not tenant:
        raise ValueError("no tenant: pass tenant_id= or set BUDGETWARDEN_TENANT")
    return tenant


def _throttle(throttle: AdaptiveThrottle | bool) -> AdaptiveThrottle | None:
    if throttle is True:
        return AdaptiveThrottle()
    if throttle is False:
        return None
    if isinstance(throttle, AdaptiveThrottle):
        return throttle
    raise ValueError(f"throttle must be True, False or an AdaptiveThrottle, not {throttle!r}")


def _check_fail_mode(fail_mode: str) -> FailMode:
    if fail_mode == "open":
        return "open"
    if fail_mode == "closed":
        return "closed"
    raise ValueError(f"fail_mode must be 'open' or 'closed', not {fail_mode!r}")


class _Settings:
    """What Budget and AsyncBudget share: who pays, the fail mode, the defaults of every step."""

    def __init__(
        self,
        tenant_id: str | None,
        fail_mode: str,
        task_type: str,
        labels: Mapping[str, str] | None,
        reporter: BackgroundReporter | None,
        addr: str,
    ) -> None:
        self.tenant_id = _tenant(tenant_id)
        self.fail_mode = _check_fail_mode(fail_mode)
        self.task_type = task_type
        self.labels = dict(labels or {})
        self.owns_reporter = reporter is None
        self.reporter = reporter if reporter is not None else BackgroundReporter(addr)

    def spec(
        self,
        task_id: str,
        step_id: str,
        *,
        model: str,
        messages: Sequence[Message] | None,
        tools: Sequence[Any] | None,
        prompt_text: str | None,
        estimated_input_tokens: int | None,
        max_output_tokens: int,
        planned_tool_calls: int,
        labels: Mapping[str, str] | None,
        lease_seconds: int | None,
        task_ceiling_tokens: int | None,
        task_type: str | None,
    ) -> StepSpec:
        return StepSpec(
            task_id=task_id,
            step_id=step_id,
            model=model,
            messages=messages,
            tools=tools,
            prompt_text=prompt_text,
            estimated_input_tokens=estimated_input_tokens,
            max_output_tokens=max_output_tokens,
            planned_tool_calls=planned_tool_calls,
            labels=self.labels | dict(labels or {}),
            lease_seconds=lease_seconds,
            task_ceiling_tokens=task_ceiling_tokens,
            task_type=self.task_type if task_type is None else task_type,
        )

    def record(self, step: Step, exc: BaseException | None) -> pb.UsageRecord | None:
        """The usage record of a step that ended with ``exc`` (None: nothing to report)."""
        return step.usage_record(self.tenant_id, outcome_of(exc))


def _messages_argument(fn: Callable[..., Any], name: str | None, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """The value of ``fn``'s argument ``name`` in a call (the first parameter is the step)."""
    if name is None:
        return None
    bound = inspect.signature(fn).bind_partial(None, *args, **kwargs)
    return bound.arguments.get(name)


class StepFnOptions(TypedDict, total=False):
    """The options of ``step_fn``: the arguments of ``budget.step`` a decorated function's steps share, and
    ``messages_arg``, the name of the function's argument holding the step's messages (they size the check)."""

    model: str
    messages_arg: str | None
    estimated_input_tokens: int | None
    max_output_tokens: int
    labels: Mapping[str, str] | None
    lease_seconds: int | None
    task_type: str | None


ClientT = TypeVar("ClientT", BudgetClient, AsyncBudgetClient)
ScopeT = TypeVar("ScopeT")


class _BudgetBase(Generic[ClientT, ScopeT]):
    """What ``Budget`` and ``AsyncBudget`` share; each adds only what blocks or awaits (its client, its scope)."""

    _client_class: type[ClientT]
    _scope_class: Callable[[Any, StepSpec], ScopeT]

    def __init__(
        self,
        addr: str | None = None,
        *,
        tenant_id: str | None = None,
        timeout: float = DEFAULT_DEADLINE,
        fail_mode: FailMode = "closed",
        task_type: str = "",
        labels: Mapping[str, str] | None = None,
        reporter: BackgroundReporter | None = None,
        throttle: AdaptiveThrottle | bool = True,
    ) -> None:
        self.throttle = _throttle(throttle)
        """The client-side adaptive throttle of this Budget's checks (None: off)."""
        self.client: ClientT = self._client_class(addr, timeout=timeout, retry_unavailable=True)
        self._settings = _Settings(tenant_id, fail_mode, task_type, labels, reporter, self.client.addr)
        self.tenant_id = self._settings.tenant_id
        self.fail_mode = self._settings.fail_mode
        self.reporter = self._settings.reporter

    def step(
        self,
        task_id: str,
        step_id: str,
        *,
        model: str = "",
        messages: Sequence[Message] | None = None,
        tools: Sequence[Any] | None = None,
        prompt_text: str | None = None,
        estimated_input_tokens: int | None = None,
        max_output_tokens: int = 0,
        planned_tool_calls: int = 0,
        labels: Mapping[str, str] | None = None,
        lease_seconds: int | None = None,
        task_ceiling_tokens: int | None = None,
        task_type: str | None = None,
    ) -> ScopeT:
        """``with budget.step(...) as step:`` (``async with`` on ``AsyncBudget``) checks the step on entering
        (CheckpointRequired, BudgetDenied, BudgetUnavailable) and reports or releases it on leaving. The input is one
        of ``messages`` (OpenAI-format, with ``tools``), ``prompt_text`` or ``estimated_input_tokens``."""
        spec = self._settings.spec(
            task_id,
            step_id,
            model=model,
            messages=messages,
            tools=tools,
            prompt_text=prompt_text,
            estimated_input_tokens=estimated_input_tokens,
            max_output_tokens=max_output_tokens,
            planned_tool_calls=planned_tool_calls,
            labels=labels,
            lease_seconds=lease_seconds,
            task_ceiling_tokens=task_ceiling_tokens,
            task_type=task_type,
        )
        return self._scope_class(self, spec)

    def _fn_scope(
        self,
        fn: Callable[..., Any],
        options: StepFnOptions,
        ids: tuple[str, str],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
    ) -> ScopeT:
        """The scope of one call of a ``step_fn``-decorated function."""
        step_options: dict[str, Any] = dict(options)
        messages = _messages_argument(fn, step_options.pop("messages_arg", None), args, kwargs)
        return self.step(*ids, messages=messages, **step_options)


class _ScopeBase:
    """What ``StepScope`` and ``AsyncStepScope`` share: the request, and what its answer (or its absence) means."""

    def __init__(self, budget: Budget | AsyncBudget, spec: StepSpec) -> None:
        self._budget = budget
        self._spec = spec
        self._approximate = False
        self._step: Step | None = None

    def _request(self) -> dict[str, Any]:
        fields, self._approximate = self._spec.request_fields(self._budget.tenant_id)
        return fields

    def _throttled(self) -> Step | None:
        """The local fail mode's step when the adaptive throttle keeps this check from the sidecar, else None (send)."""
        throttle = self._budget.throttle
        if throttle is None or throttle.admit():
            return None
        logger.debug("check of step %r throttled locally (%s)", self._spec.step_id, throttle)
        self._step = throttled(self._spec, self._budget.fail_mode, self._budget.client.addr)
        return self._step

    def _decided(self, response: pb.CheckResponse) -> Step:
        self._accepted()
        self._step = decide(self._spec, response, approximate=self._approximate)
        return self._step

    def _unanswered(self, error: grpc.RpcError) -> Step:
        """The local fail mode's step when the sidecar could not be reached; any other error is raised as it is."""
        if not is_overloaded(error):
            self._accepted()
        if not is_unreachable(error):
            raise error
        self._step = unreachable(self._spec, error, self._budget.fail_mode, self._budget.client.addr)
        return self._step

    def _accepted(self) -> None:
        """The sidecar answered this check (anything but an overload refusal): the throttle counts it accepted."""
        if self._budget.throttle is not None:
            self._budget.throttle.accepted()

    def _usage(self, exc: BaseException | None) -> tuple[pb.UsageRecord | None, str]:
        """What leaving reports (None: nothing) and the reservation to release instead ("": none), for a block that
        ended with ``exc``: a failure before any usage hands its reservation back."""
        assert self._step is not None, "the step was not entered"
        record = self._budget._settings.record(self._step, exc)
        release = self._step.reservation_id if record is None and exc is not None else ""
        return record, release


def _release_failed(reservation_id: str, error: grpc.RpcError) -> None:
    logger.warning("could not release reservation %s (its lease will lapse): %s", reservation_id, error)


class StepScope(_ScopeBase):
    """``with budget.step(...) as step:`` (see ``Budget.step``)."""

    _budget: Budget

    def __enter__(self) -> Step:
        request = self._request()
        if (step := self._throttled()) is not None:
            return step
        try:
            response = self._budget.client.check(**request)
        except grpc.RpcError as error:
            return self._unanswered(error)
        return self._decided(response)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        record, release = self._usage(exc)
        if record is not None:
            self._budget.reporter.report(record)
        if release:
            try:
                self._budget.client.release(tenant_id=self._budget.tenant_id, reservation_id=release)
            except grpc.RpcError as error:
                _release_failed(release, error)


class AsyncStepScope(_ScopeBase):
    """``async with budget.step(...) as step:`` (see ``AsyncBudget.step``)."""

    _budget: AsyncBudget

    async def __aenter__(self) -> Step:
        request = self._request()
        if (step := self._throttled()) is not None:
            return step
        try:
            response = await self._budget.client.check(**request)
        except grpc.RpcError as error:
            return self._unanswered(error)
        return self._decided(response)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        record, release = self._usage(exc)
        # Never blocking the event loop: queued at once when there is room, else report() waits in a thread (a full
        # queue with on_full="block" waits for room there, a spill writes the journal there).
        if record is not None and not self._budget.reporter.report_nowait(record):
            await asyncio.to_thread(self._budget.reporter.report, record)
        if release:
            try:
                await self._budget.client.release(tenant_id=self._budget.tenant_id, reservation_id=release)
            except grpc.RpcError as error:
                _release_failed(release, error)


class Budget(_BudgetBase[BudgetClient, StepScope]):
    """The blocking step API. ``addr``: ``BUDGETWARDEN_ADDR`` or 127.0.0.1:50151; ``tenant_id``:
    ``BUDGETWARDEN_TENANT``; ``timeout``: the deadline of a check, retries of UNAVAILABLE included; ``fail_mode``:
    what a step gets when the sidecar cannot be reached within it, ``"closed"`` (BudgetUnavailable, the default) or
    ``"open"`` (the step runs, marked ``step.from_fail_mode``); ``reporter``: the BackgroundReporter usage goes through
    (default: one of its own, closed with the Budget); ``throttle``: client-side adaptive throttling of checks while
    the sidecar refuses most of them for overload (True, the default: ``AdaptiveThrottle()``, k=2 over 120 s; an
    ``AdaptiveThrottle(k=..., window=...)`` of your own; False: off), a throttled check gets the fail mode's answer."""

    _client_class = BudgetClient
    _scope_class = StepScope

    def step_fn(
        self, **options: Unpack[StepFnOptions]
    ) -> Callable[[Callable[Concatenate[Step, P], R]], Callable[Concatenate[str, str, P], R]]:
        """A decorator: ``fn(step, *args)`` becomes ``fn(task_id, step_id, *args)``, run inside ``budget.step`` with
        ``options`` (see ``StepFnOptions``)."""

        def decorate(fn: Callable[Concatenate[Step, P], R]) -> Callable[Concatenate[str, str, P], R]:
            @functools.wraps(fn)
            def run(task_id: str, step_id: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
                with self._fn_scope(fn, options, (task_id, step_id), args, kwargs) as step:
                    return fn(step, *args, **kwargs)

            return run

        return decorate

    def close(self, drain_timeout: float | None = 10.0) -> None:
        """Closes the channel and (when it is the Budget's own) the reporter, which delivers what is queued first,
        for up to ``drain_timeout`` seconds."""
        if self._settings.owns_reporter:
            self.reporter.close(drain_timeout)
        self.client.close()

    def __enter__(self) -> Budget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncBudget(_BudgetBase[AsyncBudgetClient, AsyncStepScope]):
    """The asyncio twin of :class:`Budget`: ``async with budget.step(...) as step:``. Usage goes through the same
    thread-based BackgroundReporter, without ever blocking the event loop: a record is queued at once when there is
    room, and when there is none (``on_full="block"``, or ``"spill"`` writing the journal) the step's exit awaits
    ``report()`` in a thread while the loop runs on."""

    _client_class = AsyncBudgetClient
    _scope_class = AsyncStepScope

    def step_fn(
        self, **options: Unpack[StepFnOptions]
    ) -> Callable[[Callable[Concatenate[Step, P], Awaitable[R]]], Callable[Concatenate[str, str, P], Awaitable[R]]]:
        """See ``Budget.step_fn``; for coroutine functions."""

        def decorate(
            fn: Callable[Concatenate[Step, P], Awaitable[R]],
        ) -> Callable[Concatenate[str, str, P], Awaitable[R]]:
            @functools.wraps(fn)
            async def run(task_id: str, step_id: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
                async with self._fn_scope(fn, options, (task_id, step_id), args, kwargs) as step:
                    return await fn(step, *args, **kwargs)

            return run

        return decorate

    async def close(self, drain_timeout: float | None = 10.0) -> None:
        """See ``Budget.close``; the reporter is drained off the event loop, for up to ``drain_timeout`` seconds."""
        if self._settings.owns_reporter:
            await asyncio.to_thread(self.reporter.close, drain_timeout)
        await self.client.close()

    async def __aenter__(self) -> AsyncBudget:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
