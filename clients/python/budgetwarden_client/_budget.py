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
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc

from budgetwarden_client._client import AsyncBudgetClient, BudgetClient, default_tenant
from budgetwarden_client._messages import Message
from budgetwarden_client._reporter import BackgroundReporter
from budgetwarden_client._step import FailMode, Step, StepSpec, decide, is_unreachable, outcome_of, unreachable

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

    def report(self, step: Step, exc: BaseException | None) -> bool:
        """Queues the step's usage for the way it ended; False when there is none to report."""
        record = step.usage_record(self.tenant_id, outcome_of(exc))
        if record is None:
            return False
        self.reporter.report(record)
        return True

    async def report_async(self, step: Step, exc: BaseException | None) -> bool:
        """``report`` without ever blocking the event loop: queued at once when there is room, else handed to
        ``report()`` in a thread (a full queue with ``on_full="block"`` waits there, a spill writes the journal
        there), the step's exit awaiting it while the loop runs on."""
        record = step.usage_record(self.tenant_id, outcome_of(exc))
        if record is None:
            return False
        if not self.reporter.report_nowait(record):
            await asyncio.to_thread(self.reporter.report, record)
        return True


def _messages_argument(fn: Callable[..., Any], name: str | None, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """The value of ``fn``'s argument ``name`` in a call (the first parameter is the step)."""
    if name is None:
        return None
    bound = inspect.signature(fn).bind_partial(None, *args, **kwargs)
    return bound.arguments.get(name)


class Budget:
    """The blocking step API. ``addr``: ``BUDGETWARDEN_ADDR`` or 127.0.0.1:50151; ``tenant_id``:
    ``BUDGETWARDEN_TENANT``; ``timeout``: the deadline of a check, retries of UNAVAILABLE included; ``fail_mode``:
    what a step gets when the sidecar cannot be reached within it, ``"closed"`` (BudgetUnavailable, the default) or
    ``"open"`` (the step runs, marked ``step.from_fail_mode``); ``reporter``: the BackgroundReporter usage goes through
    (default: one of its own, closed with the Budget)."""

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
    ) -> None:
        self.client = BudgetClient(addr, timeout=timeout, retry_unavailable=True)
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
    ) -> StepScope:
        """``with budget.step(...) as step:`` checks the step on entering (CheckpointRequired, BudgetDenied,
        BudgetUnavailable) and reports or releases it on leaving. The input is one of ``messages`` (OpenAI-format,
        with ``tools``), ``prompt_text`` or ``estimated_input_tokens``."""
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
        return StepScope(self, spec)

    def step_fn(
        self,
        *,
        model: str = "",
        messages_arg: str | None = None,
        estimated_input_tokens: int | None = None,
        max_output_tokens: int = 0,
        labels: Mapping[str, str] | None = None,
        lease_seconds: int | None = None,
        task_type: str | None = None,
    ) -> Callable[[Callable[Concatenate[Step, P], R]], Callable[Concatenate[str, str, P], R]]:
        """A decorator: ``fn(step, *args)`` becomes ``fn(task_id, step_id, *args)``, run inside ``budget.step``.
        ``messages_arg`` names the argument of ``fn`` holding the step's messages (they size the check)."""

        def decorate(fn: Callable[Concatenate[Step, P], R]) -> Callable[Concatenate[str, str, P], R]:
            @functools.wraps(fn)
            def run(task_id: str, step_id: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
                messages = _messages_argument(fn, messages_arg, args, kwargs)
                scope = self.step(
                    task_id,
                    step_id,
                    model=model,
                    messages=messages,
                    estimated_input_tokens=estimated_input_tokens,
                    max_output_tokens=max_output_tokens,
                    labels=labels,
                    lease_seconds=lease_seconds,
                    task_type=task_type,
                )
                with scope as step:
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


class StepScope:
    """``with budget.step(...) as step:`` (see ``Budget.step``)."""

    def __init__(self, budget: Budget, spec: StepSpec) -> None:
        self._budget = budget
        self._spec = spec
        self._step: Step | None = None

    def __enter__(self) -> Step:
        budget = self._budget
        fields, approximate = self._spec.request_fields(budget.tenant_id)
        try:
            response = budget.client.check(**fields)
        except grpc.RpcError as error:
            if not is_unreachable(error):
                raise
            self._step = unreachable(self._spec, error, budget.fail_mode, budget.client.addr)
        else:
            self._step = decide(self._spec, response, approximate=approximate)
        return self._step

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        step = self._step
        assert step is not None, "the step was not entered"
        if self._budget._settings.report(step, exc) or not step.reservation_id or exc is None:
            return
        try:  # failed before it spent anything: hand the reservation back
            self._budget.client.release(tenant_id=self._budget.tenant_id, reservation_id=step.reservation_id)
        except grpc.RpcError as error:
            logger.warning("could not release reservation %s (its lease will lapse): %s", step.reservation_id, error)


class AsyncBudget:
    """The asyncio twin of :class:`Budget`: ``async with budget.step(...) as step:``. Usage goes through the same
    thread-based BackgroundReporter, without ever blocking the event loop: a record is queued at once when there is
    room, and when there is none (``on_full="block"``, or ``"spill"`` writing the journal) the step's exit awaits
    ``report()`` in a thread while the loop runs on."""

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
    ) -> None:
        self.client = AsyncBudgetClient(addr, timeout=timeout, retry_unavailable=True)
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
    ) -> AsyncStepScope:
        """See ``Budget.step``."""
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
        return AsyncStepScope(self, spec)

    def step_fn(
        self,
        *,
        model: str = "",
        messages_arg: str | None = None,
        estimated_input_tokens: int | None = None,
        max_output_tokens: int = 0,
        labels: Mapping[str, str] | None = None,
        lease_seconds: int | None = None,
        task_type: str | None = None,
    ) -> Callable[[Callable[Concatenate[Step, P], Awaitable[R]]], Callable[Concatenate[str, str, P], Awaitable[R]]]:
        """See ``Budget.step_fn``; for coroutine functions."""

        def decorate(
            fn: Callable[Concatenate[Step, P], Awaitable[R]],
        ) -> Callable[Concatenate[str, str, P], Awaitable[R]]:
            @functools.wraps(fn)
            async def run(task_id: str, step_id: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
                messages = _messages_argument(fn, messages_arg, args, kwargs)
                scope = self.step(
                    task_id,
                    step_id,
                    model=model,
                    messages=messages,
                    estimated_input_tokens=estimated_input_tokens,
                    max_output_tokens=max_output_tokens,
                    labels=labels,
                    lease_seconds=lease_seconds,
                    task_type=task_type,
                )
                async with scope as step:
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


class AsyncStepScope:
    """``async with budget.step(...) as step:`` (see ``AsyncBudget.step``)."""

    def __init__(self, budget: AsyncBudget, spec: StepSpec) -> None:
        self._budget = budget
        self._spec = spec
        self._step: Step | None = None

    async def __aenter__(self) -> Step:
        budget = self._budget
        fields, approximate = self._spec.request_fields(budget.tenant_id)
        try:
            response = await budget.client.check(**fields)
        except grpc.RpcError as error:
            if not is_unreachable(error):
                raise
            self._step = unreachable(self._spec, error, budget.fail_mode, budget.client.addr)
        else:
            self._step = decide(self._spec, response, approximate=approximate)
        return self._step

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        step = self._step
        assert step is not None, "the step was not entered"
        if await self._budget._settings.report_async(step, exc) or not step.reservation_id or exc is None:
            return
        try:
            await self._budget.client.release(tenant_id=self._budget.tenant_id, reservation_id=step.reservation_id)
        except grpc.RpcError as error:
            logger.warning("could not release reservation %s (its lease will lapse): %s", step.reservation_id, error)
