"""Budgets for the OpenAI Python SDK: wrap a client, and every call that makes the model generate is one budget step.

::

    from openai import OpenAI
    from budgetwarden_client import Budget
    from budgetwarden_client.integrations.openai import budgeted

    client = budgeted(OpenAI(), Budget(), task_id="task-42")
    reply = client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=800, budget_step_id="plan-1")

Budgeted, on ``chat.completions`` and ``responses`` alike: ``create`` (streaming or not), ``parse``, ``stream`` (the
SDK's event-stream helper) and the same calls through ``with_raw_response`` and ``with_streaming_response``.

Before the HTTP request the step is checked with the call's messages (or ``input``, ``instructions`` and ``tools``)
and its output cap; CHECKPOINT and DENY raise ``CheckpointRequired`` / ``BudgetDenied`` and no request is sent.
DEGRADE swaps the model, caps the output and trims the messages to the advised context. After the call the
response's ``usage`` is reported (cached input and reasoning tokens included); a call that fails releases the
reservation.

Streams are wrapped: chat streams are made to end with a usage chunk (``stream_options.include_usage``), Responses
streams report the usage of ``response.completed``. A stream closed before its usage arrived (``break``, ``close()``,
leaving its ``with``) is charged what its step reserved: the server generated tokens the client never saw, and the
reservation bounds them from above. The same holds for a ``with_streaming_response`` body left unread, and for a
``with_raw_response`` stream: its step ends when the stream its ``parse()`` gives ends.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, overload

import openai
from openai._legacy_response import (
    LegacyAPIResponse,
    async_to_raw_response_wrapper,
    to_raw_response_wrapper,
)
from openai._response import async_to_streamed_response_wrapper, to_streamed_response_wrapper

from budgetwarden_client._budget import AsyncBudget, AsyncStepScope, Budget, StepScope
from budgetwarden_client._messages import Message, as_dict
from budgetwarden_client._step import Step
from budgetwarden_client._usage import AsyncBudgetedStream, BudgetedStream, exc_info, get, record_usage

__all__ = ["AsyncBudgetedOpenAI", "AsyncBudgetedStream", "BudgetedOpenAI", "BudgetedStream", "budgeted"]


def new_step_id() -> str:
    """The step id of a call that gave none: unique, so that two calls are never taken for a retry of one step."""
    return f"openai-{uuid.uuid4().hex}"


# --- what a call asks for -------------------------------------------------------------------------------------------


def _response_item_message(item: Any) -> Message:
    """A Responses ``input`` item as the chat message it is counted as."""
    fields = as_dict(item)
    kind = fields.get("type", "message")
    if "role" in fields:
        return fields
    if kind == "function_call":
        call = {"type": "function", "function": {"name": fields.get("name", ""), "arguments": fields.get("arguments")}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    if kind == "function_call_output":
        output = fields.get("output", "")
        return {"role": "tool", "content": output if isinstance(output, str) else json.dumps(output)}
    return {"role": "assistant", "content": json.dumps(fields, default=str)}  # any other item: counted as its JSON


def _instructions(kwargs: Mapping[str, Any]) -> list[Message]:
    instructions = kwargs.get("instructions")
    return [{"role": "system", "content": instructions}] if isinstance(instructions, str) and instructions else []


@dataclass(frozen=True)
class _Endpoint:
    """What differs between Chat Completions and Responses; everything else is one path."""

    items_key: str
    """The argument holding the conversation (a list of items; Responses also takes a string)."""
    caps: tuple[str, ...]
    """The output caps the endpoint takes, the first the one set on DEGRADE when the call gave none."""
    prefix: Callable[[Mapping[str, Any]], list[Message]]
    """Messages counted before the items (Responses' ``instructions``)."""
    as_message: Callable[[Any], Message]
    """One item as the chat message the sidecar counts."""
    asks_stream_usage: bool
    """A stream sends its usage only when ``stream_options.include_usage`` asks for it."""


CHAT = _Endpoint("messages", ("max_completion_tokens", "max_tokens"), lambda kwargs: [], lambda item: item, True)
RESPONSES = _Endpoint("input", ("max_output_tokens",), _instructions, _response_item_message, False)


class _Call:
    """One call's keyword arguments, read as a budget step and rewritten by its advice."""

    def __init__(self, endpoint: _Endpoint, kwargs: dict[str, Any]) -> None:
        self.endpoint = endpoint
        self.kwargs = kwargs
        given = kwargs.get(endpoint.items_key)
        self.items: list[Any] | None = None  # the trimmable items; the tail of ``messages``, one message each
        self.messages: list[Message] = endpoint.prefix(kwargs)
        if isinstance(given, str):  # one message: nothing to cut
            self.messages.append({"role": "user", "content": given})
        elif given is not None:
            self.items = list(given)
            kwargs[endpoint.items_key] = self.items  # read once: an iterator given is sent as the list it gave
            self.messages.extend(endpoint.as_message(item) for item in self.items)

    @property
    def max_output_tokens(self) -> int:
        caps = [self.kwargs[name] for name in self.endpoint.caps if isinstance(self.kwargs.get(name), int)]
        return min(caps) if caps else 0

    def step_arguments(self) -> dict[str, Any]:
        tools = self.kwargs.get("tools")
        return {
            "model": str(self.kwargs.get("model") or ""),
            "messages": self.messages,
            "tools": list(tools) if tools else None,
            "max_output_tokens": self.max_output_tokens,
        }

    def apply(self, step: Step, *, streams: bool) -> dict[str, Any]:
        """The keyword arguments to send: the step's model and cap, the items trimmed to its context cap, and (for a
        stream that would not send it otherwise) the usage asked for."""
        kwargs = dict(self.kwargs)
        if step.model:
            kwargs["model"] = step.model
        asked = self.max_output_tokens
        cap = min(step.max_tokens, asked) if step.max_tokens and asked else step.max_tokens
        if cap and cap != asked:  # the advice's cap, never above the caller's own
            for name in [name for name in self.endpoint.caps if name in kwargs] or [self.endpoint.caps[0]]:
                kwargs[name] = cap
        if step.max_context_tokens is not None and self.items is not None:
            kwargs[self.endpoint.items_key] = step.trim_items(self.items, self.messages)
        if streams and self.endpoint.asks_stream_usage:
            kwargs["stream_options"] = {**dict(kwargs.get("stream_options") or {}), "include_usage": True}
        return kwargs


# --- responses the caller reads later: raw ones, and with_streaming_response's ------------------------------------


class _RawStreamResponse:
    """A ``with_raw_response`` stream: its ``parse()`` gives the budgeted stream, whose end ends the step."""

    def __init__(self, raw: Any, wrap: Callable[[Any], Any]) -> None:
        self._raw = raw
        self._wrap = wrap
        self._stream: Any = None

    def parse(self, **kwargs: Any) -> Any:
        if self._stream is None:
            self._stream = self._wrap(self._raw.parse(**kwargs))
        return self._stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _StreamedResponse:
    """A ``with_streaming_response`` response (the body not read yet): ``parse()`` reads it and reports its usage (a
    stream: gives the budgeted stream); leaving the ``with`` (``close()``) ends the step, a body never parsed charged
    as the reservation."""

    def __init__(self, response: Any, step: Step, scope: StepScope, streams: bool) -> None:
        self._response = response
        self._step = step
        self._scope = scope
        self._streams = streams
        self._stream: BudgetedStream | None = None
        self._done = False

    def parse(self, **kwargs: Any) -> Any:
        parsed = self._response.parse(**kwargs)
        if not self._streams:
            if not self._step.usage_recorded:
                record_usage(self._step, get(parsed, "usage"))
            return parsed
        if self._stream is None:
            self._stream = BudgetedStream(parsed, self._step, self._scope)
        return self._stream

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        elif not self._done:
            self._done = True
            if not self._streams and not self._step.usage_recorded:
                self.parse()  # the body left unread: read its usage (one JSON object) rather than guess
            self._scope.__exit__(None, None, None)  # a stream never parsed: charged its reservation
        self._response.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._response, name)


class _AsyncStreamedResponse:
    """The asyncio twin of ``_StreamedResponse``."""

    def __init__(self, response: Any, step: Step, scope: AsyncStepScope, streams: bool) -> None:
        self._response = response
        self._step = step
        self._scope = scope
        self._streams = streams
        self._stream: AsyncBudgetedStream | None = None
        self._done = False

    async def parse(self, **kwargs: Any) -> Any:
        parsed = await self._response.parse(**kwargs)
        if not self._streams:
            if not self._step.usage_recorded:
                record_usage(self._step, get(parsed, "usage"))
            return parsed
        if self._stream is None:
            self._stream = AsyncBudgetedStream(parsed, self._step, self._scope)
        return self._stream

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()
        elif not self._done:
            self._done = True
            if not self._streams and not self._step.usage_recorded:
                await self.parse()
            await self._scope.__aexit__(None, None, None)
        await self._response.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._response, name)


class _StreamManager:
    """The SDK's stream manager (``with client.chat.completions.stream(...) as stream:``), ending the step on exit."""

    def __init__(self, manager: Any, opened: list[BudgetedStream]) -> None:
        self._manager = manager
        self._opened = opened

    def __enter__(self) -> Any:
        return self._manager.__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            self._manager.__exit__(*exc)
        finally:
            for stream in self._opened:
                stream.close()


class _AsyncStreamManager:
    """The asyncio twin of ``_StreamManager``."""

    def __init__(self, manager: Any, opened: list[AsyncBudgetedStream]) -> None:
        self._manager = manager
        self._opened = opened

    async def __aenter__(self) -> Any:
        return await self._manager.__aenter__()

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self._manager.__aexit__(*exc)
        finally:
            for stream in self._opened:
                await stream.close()


# --- the wrapped resources ------------------------------------------------------------------------------------------


class _Wrapped:
    """Stands for an SDK resource (or its ``with_raw_response`` / ``with_streaming_response`` view) with some methods
    replaced: the SDK's helpers called on it (``stream``) call the budgeted ``create``; the rest is the resource's."""

    def __init__(self, resource: Any, **methods: Any) -> None:
        self._resource = resource
        self.__dict__.update(methods)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._resource, name)


class _ResourceBase:
    """``chat.completions`` or ``responses`` of a budgeted client: every generating call a budget step. The SDK's own
    ``with_raw_response`` / ``with_streaming_response`` wrappers (``raw_wrapper``, ``streamed_wrapper``) are put
    around the budgeted ``create`` and ``parse``; what blocks or awaits is the subclasses'."""

    raw_wrapper: staticmethod[[Callable[..., Any]], Callable[..., Any]]
    streamed_wrapper: staticmethod[[Callable[..., Any]], Callable[..., Any]]

    def __init__(self, owner: Any, endpoint: _Endpoint, resource: Any) -> None:
        self._owner = owner
        self._endpoint = endpoint
        self._resource = resource
        create = self._budgeted(resource.create)
        parse = self._budgeted(resource.parse)
        self.create = create
        self.parse = parse
        raw, streamed = self.raw_wrapper, self.streamed_wrapper
        self.with_raw_response = _Wrapped(resource.with_raw_response, create=raw(create), parse=raw(parse))
        self.with_streaming_response = _Wrapped(
            resource.with_streaming_response, create=streamed(create), parse=streamed(parse)
        )
        if hasattr(type(resource), "stream"):
            self.stream = functools.partial(self._stream, type(resource).stream)

    def __getattr__(self, name: str) -> Any:  # the resource's other methods, unbudgeted
        return getattr(self._resource, name)

    def _budgeted(self, send: Callable[..., Any]) -> Callable[..., Any]:
        raise NotImplementedError

    def _stream(self, helper: Callable[..., Any], **kwargs: Any) -> Any:
        raise NotImplementedError

    def _step(self, kwargs: dict[str, Any], task_id: str | None, step_id: str | None) -> tuple[_Call, Any]:
        """The call read as a step, and its (not yet entered) scope."""
        request = _Call(self._endpoint, kwargs)
        owner = self._owner
        scope = owner.budget.step(
            task_id or owner.task_id, step_id or new_step_id(), **request.step_arguments(), **owner.step_options
        )
        return request, scope


class _Resource(_ResourceBase):
    """``_ResourceBase`` for ``openai.OpenAI`` and a ``Budget``."""

    raw_wrapper = staticmethod(to_raw_response_wrapper)
    streamed_wrapper = staticmethod(to_streamed_response_wrapper)

    def _stream(
        self,
        helper: Callable[..., Any],
        *,
        budget_step_id: str | None = None,
        budget_task_id: str | None = None,
        **kwargs: Any,
    ) -> _StreamManager:
        """The SDK's ``stream`` helper called on a stand-in whose ``create`` is the budgeted one: the step is checked
        when the manager is entered (the helper sends the request then) and ends with the stream, or when the manager
        is left (the helper's own stream only closes the HTTP response)."""
        opened: list[BudgetedStream] = []

        def create(**sent: Any) -> Any:
            stream = self.create(budget_step_id=budget_step_id, budget_task_id=budget_task_id, **sent)
            opened.append(stream)
            return stream

        return _StreamManager(helper(_Wrapped(self._resource, create=create), **kwargs), opened)

    def _budgeted(self, send: Callable[..., Any]) -> Callable[..., Any]:
        def call(*, budget_step_id: str | None = None, budget_task_id: str | None = None, **kwargs: Any) -> Any:
            """The SDK's method, checked before and reported after. ``budget_step_id``: the step's id (default: a
            new one per call); ``budget_task_id``: the task's (default: the wrapper's)."""
            request, scope = self._step(kwargs, budget_task_id, budget_step_id)
            step = scope.__enter__()  # CHECKPOINT and DENY raise here, before any request
            streams = bool(kwargs.get("stream"))
            try:
                result = send(**request.apply(step, streams=streams))
            except BaseException as error:
                scope.__exit__(*exc_info(error))  # nothing spent: the reservation is released
                raise
            return self._settle(result, step, scope, streams)

        return call

    @staticmethod
    def _settle(result: Any, step: Step, scope: StepScope, streams: bool) -> Any:
        """What the caller gets: a stream that ends the step when it ends, or the result with its usage reported."""
        if isinstance(result, openai.APIResponse):  # with_streaming_response: the body is read later
            return _StreamedResponse(result, step, scope, streams)
        if isinstance(result, LegacyAPIResponse) and streams:
            return _RawStreamResponse(result, lambda stream: BudgetedStream(stream, step, scope))
        if isinstance(result, openai.Stream):
            return BudgetedStream(result, step, scope)
        parsed = result.parse() if isinstance(result, LegacyAPIResponse) else result
        record_usage(step, get(parsed, "usage"))
        scope.__exit__(None, None, None)
        return result


class _AsyncResource(_ResourceBase):
    """``_ResourceBase`` for ``openai.AsyncOpenAI`` and an ``AsyncBudget``."""

    raw_wrapper = staticmethod(async_to_raw_response_wrapper)
    streamed_wrapper = staticmethod(async_to_streamed_response_wrapper)

    def _stream(
        self,
        helper: Callable[..., Any],
        *,
        budget_step_id: str | None = None,
        budget_task_id: str | None = None,
        **kwargs: Any,
    ) -> _AsyncStreamManager:
        """See ``_Resource._stream``."""
        opened: list[AsyncBudgetedStream] = []

        async def create(**sent: Any) -> Any:
            stream = await self.create(budget_step_id=budget_step_id, budget_task_id=budget_task_id, **sent)
            opened.append(stream)
            return stream

        return _AsyncStreamManager(helper(_Wrapped(self._resource, create=create), **kwargs), opened)

    def _budgeted(self, send: Callable[..., Any]) -> Callable[..., Any]:
        async def call(*, budget_step_id: str | None = None, budget_task_id: str | None = None, **kwargs: Any) -> Any:
            """See ``_Resource``."""
            request, scope = self._step(kwargs, budget_task_id, budget_step_id)
            step = await scope.__aenter__()
            streams = bool(kwargs.get("stream"))
            try:
                result = await send(**request.apply(step, streams=streams))
            except BaseException as error:
                await scope.__aexit__(*exc_info(error))
                raise
            return await self._settle(result, step, scope, streams)

        return call

    @staticmethod
    async def _settle(result: Any, step: Step, scope: AsyncStepScope, streams: bool) -> Any:
        if isinstance(result, openai.AsyncAPIResponse):
            return _AsyncStreamedResponse(result, step, scope, streams)
        if isinstance(result, LegacyAPIResponse) and streams:
            return _RawStreamResponse(result, lambda stream: AsyncBudgetedStream(stream, step, scope))
        if isinstance(result, openai.AsyncStream):
            return AsyncBudgetedStream(result, step, scope)
        parsed = result.parse() if isinstance(result, LegacyAPIResponse) else result
        record_usage(step, get(parsed, "usage"))
        await scope.__aexit__(None, None, None)
        return result


class _Chat:
    """``client.chat`` with its ``completions`` budgeted; the rest is the SDK's."""

    def __init__(self, chat: Any, completions: Any) -> None:
        self._chat = chat
        self.completions = completions

    def __getattr__(self, name: str) -> Any:
        return getattr(self._chat, name)


class BudgetedOpenAI:
    """An ``openai.OpenAI`` whose generating calls on ``chat.completions`` and ``responses`` (``create``, ``parse``,
    ``stream``, and through ``with_raw_response`` / ``with_streaming_response``) are budget steps of ``task_id``;
    every other attribute is the client's own (unbudgeted). ``step_options``: further arguments of every
    ``budget.step`` (``labels``, ``task_type``, ``lease_seconds``, ``task_ceiling_tokens``)."""

    def __init__(self, client: openai.OpenAI, budget: Budget, *, task_id: str, **step_options: Any) -> None:
        self.client = client
        self.budget = budget
        self.task_id = task_id
        self.step_options = step_options
        self.chat = _Chat(client.chat, _Resource(self, CHAT, client.chat.completions))
        self.responses = _Resource(self, RESPONSES, client.responses)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


class AsyncBudgetedOpenAI:
    """The asyncio twin of :class:`BudgetedOpenAI`, for ``openai.AsyncOpenAI`` and an ``AsyncBudget``."""

    def __init__(self, client: openai.AsyncOpenAI, budget: AsyncBudget, *, task_id: str, **step_options: Any) -> None:
        self.client = client
        self.budget = budget
        self.task_id = task_id
        self.step_options = step_options
        self.chat = _Chat(client.chat, _AsyncResource(self, CHAT, client.chat.completions))
        self.responses = _AsyncResource(self, RESPONSES, client.responses)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


@overload
def budgeted(client: openai.OpenAI, budget: Budget, *, task_id: str, **step_options: Any) -> BudgetedOpenAI: ...
@overload
def budgeted(
    client: openai.AsyncOpenAI, budget: AsyncBudget, *, task_id: str, **step_options: Any
) -> AsyncBudgetedOpenAI: ...
def budgeted(
    client: openai.OpenAI | openai.AsyncOpenAI, budget: Budget | AsyncBudget, *, task_id: str, **step_options: Any
) -> BudgetedOpenAI | AsyncBudgetedOpenAI:
    """``client`` with every generating call of ``chat.completions`` and ``responses`` a step of ``task_id`` under
    ``budget``: an ``OpenAI`` with a ``Budget``, or an ``AsyncOpenAI`` with an ``AsyncBudget``."""
    if isinstance(client, openai.AsyncOpenAI) and isinstance(budget, AsyncBudget):
        return AsyncBudgetedOpenAI(client, budget, task_id=task_id, **step_options)
    if isinstance(client, openai.OpenAI) and isinstance(budget, Budget):
        return BudgetedOpenAI(client, budget, task_id=task_id, **step_options)
    raise TypeError("budgeted() takes an OpenAI client with a Budget, or an AsyncOpenAI client with an AsyncBudget")
