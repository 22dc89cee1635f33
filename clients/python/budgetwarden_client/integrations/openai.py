"""Budgets for the OpenAI Python SDK: wrap a client, and every ``chat.completions.create`` and ``responses.create``
is one budget step.

::

    from openai import OpenAI
    from budgetwarden_client import Budget
    from budgetwarden_client.integrations.openai import budgeted

    client = budgeted(OpenAI(), Budget(), task_id="task-42")
    reply = client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=800, budget_step_id="plan-1")

Before the HTTP call the step is checked with the call's messages (or ``input``, ``instructions`` and ``tools``) and
its output cap; CHECKPOINT and DENY raise ``CheckpointRequired`` / ``BudgetDenied`` and no request is sent. DEGRADE
swaps the model, caps the output and trims the messages to the advised context. After the call the response's
``usage`` is reported (cached input and reasoning tokens included); a call that fails releases the reservation.

Streams are wrapped: chat streams are made to end with a usage chunk (``stream_options.include_usage``), Responses
streams report the usage of ``response.completed``. A stream closed before its usage arrived (``break``, ``close()``,
leaving its ``with``) is charged what its step reserved: the server generated tokens the client never saw, and the
reservation bounds them from above.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, overload

import openai

from budgetwarden_client._budget import AsyncBudget, AsyncStepScope, Budget, StepScope
from budgetwarden_client._messages import Message, as_dict
from budgetwarden_client._step import Step

__all__ = ["AsyncBudgetedOpenAI", "AsyncBudgetedStream", "BudgetedOpenAI", "BudgetedStream", "budgeted"]

# The output caps each endpoint takes, the first the one set on DEGRADE when the call gave none.
CHAT_CAPS = ("max_completion_tokens", "max_tokens")
RESPONSES_CAPS = ("max_output_tokens",)


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


class _Call:
    """One ``create`` call's keyword arguments, read as a budget step and rewritten by its advice."""

    def __init__(self, endpoint: str, kwargs: dict[str, Any]) -> None:
        self.endpoint = endpoint
        self.kwargs = kwargs
        self.caps = CHAT_CAPS if endpoint == "chat" else RESPONSES_CAPS
        self.items: list[Any] | None = None  # Responses input items, parallel to messages
        self.messages: list[Message] = self._messages()

    def _messages(self) -> list[Message]:
        if self.endpoint == "chat":
            return list(self.kwargs.get("messages") or [])
        messages: list[Message] = []
        instructions = self.kwargs.get("instructions")
        if isinstance(instructions, str) and instructions:
            messages.append({"role": "system", "content": instructions})
        given = self.kwargs.get("input")
        if isinstance(given, str):
            messages.append({"role": "user", "content": given})
        elif given is not None:
            self.items = list(given)
            messages.extend(_response_item_message(item) for item in self.items)
        return messages

    @property
    def max_output_tokens(self) -> int:
        caps = [self.kwargs[name] for name in self.caps if isinstance(self.kwargs.get(name), int)]
        return min(caps) if caps else 0

    def step_arguments(self) -> dict[str, Any]:
        tools = self.kwargs.get("tools")
        return {
            "model": str(self.kwargs.get("model") or ""),
            "messages": self.messages,
            "tools": list(tools) if tools else None,
            "max_output_tokens": self.max_output_tokens,
        }

    def apply(self, step: Step) -> dict[str, Any]:
        """The keyword arguments to send: the step's model and cap, the messages trimmed to its context cap."""
        kwargs = dict(self.kwargs)
        if step.model:
            kwargs["model"] = step.model
        asked = self.max_output_tokens
        cap = min(step.max_tokens, asked) if step.max_tokens and asked else step.max_tokens
        if cap and cap != asked:  # the advice's cap, never above the caller's own
            for name in [name for name in self.caps if name in kwargs] or [self.caps[0]]:
                kwargs[name] = cap
        if step.max_context_tokens is not None:
            self._trim(step, kwargs)
        return kwargs

    def _trim(self, step: Step, kwargs: dict[str, Any]) -> None:
        kept = step.trim(self.messages)
        if self.endpoint == "chat":
            kwargs["messages"] = kept
        elif self.items is not None:  # a string input is one message: nothing to cut
            kept_ids = {id(message) for message in kept}
            offset = len(self.messages) - len(self.items)  # the instructions' message comes first
            kwargs["input"] = [item for i, item in enumerate(self.items) if id(self.messages[offset + i]) in kept_ids]

    def force_usage_chunk(self, kwargs: dict[str, Any]) -> None:
        """A chat stream sends its usage only when asked to: ask."""
        if self.endpoint == "chat" and kwargs.get("stream"):
            kwargs["stream_options"] = {**dict(kwargs.get("stream_options") or {}), "include_usage": True}


# --- what a call spent ----------------------------------------------------------------------------------------------


def _get(value: Any, *path: str) -> Any:
    for name in path:
        if value is None:
            return None
        value = value.get(name) if isinstance(value, Mapping) else getattr(value, name, None)
    return value


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def record_usage(step: Step, usage: Any) -> bool:
    """Records a Chat Completions or Responses ``usage`` on the step; False when there is none. Reasoning tokens are
    part of ``completion_tokens`` / ``output_tokens`` already, so they are charged through them."""
    if usage is None:
        return False
    if _get(usage, "prompt_tokens") is not None:  # Chat Completions
        step.record_usage(
            input_tokens=_int(_get(usage, "prompt_tokens")),
            output_tokens=_int(_get(usage, "completion_tokens")),
            cached_input_tokens=_int(_get(usage, "prompt_tokens_details", "cached_tokens")),
        )
    else:  # Responses
        step.record_usage(
            input_tokens=_int(_get(usage, "input_tokens")),
            output_tokens=_int(_get(usage, "output_tokens")),
            cached_input_tokens=_int(_get(usage, "input_tokens_details", "cached_tokens")),
        )
    return True


def _chunk_usage(chunk: Any) -> Any:
    """The usage a stream chunk or event carries: a chat chunk's ``usage``, a Responses terminal event's."""
    if _get(chunk, "type") in ("response.completed", "response.incomplete", "response.failed"):
        return _get(chunk, "response", "usage")
    return _get(chunk, "usage")


def _charge_if_streamed(step: Step, received: bool) -> None:
    """A stream that failed after the server began sending spent tokens nobody reported: they are charged as the
    reservation (its counted input, the rest as output), as the step API charges a step that completed without usage.
    One that failed before any chunk spent nothing: its reservation is released."""
    if received and not step.usage_recorded and step.reservation_id:
        reserved_input = min(step.input_tokens, step.max_context_tokens or step.input_tokens, step.granted_tokens)
        step.record_usage(input_tokens=reserved_input, output_tokens=step.granted_tokens - reserved_input)


# --- streams --------------------------------------------------------------------------------------------------------


class BudgetedStream:
    """An SDK ``Stream`` whose step is reported when it ends: at its usage chunk's end, on ``close()`` or leaving its
    ``with``, or when a ``for`` loop over it is left early (the loop's iterator is then closed). Everything else is
    the SDK stream's (``response``, ...)."""

    def __init__(self, stream: Any, step: Step, scope: StepScope) -> None:
        self._stream = stream
        self.step = step
        """The budget step of the call (``step.granted_tokens``: what an early close is charged)."""
        self._scope = scope
        self._done = False
        self._received = False
        self._iterator: Iterator[Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A fresh generator the loop alone holds: leaving the loop early finalizes it, which ends the step.
        return self._chunks()

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._chunks()
        return next(self._iterator)

    def _chunks(self) -> Iterator[Any]:
        error: BaseException | None = None
        try:
            for chunk in self._stream:
                record_usage(self.step, _chunk_usage(chunk))
                self._received = True
                yield chunk
        except GeneratorExit:
            raise
        except BaseException as exc:
            error = exc
            _charge_if_streamed(self.step, self._received)
            raise
        finally:
            self._finish(error)

    def _finish(self, error: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        self._stream.close()
        self._scope.__exit__(type(error) if error else None, error, error.__traceback__ if error else None)

    def close(self) -> None:
        self._finish(None)

    def __enter__(self) -> BudgetedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class AsyncBudgetedStream:
    """The asyncio twin of :class:`BudgetedStream`. An ``async for`` left early ends the step when asyncio finalizes
    the loop's iterator (soon after the ``break``); ``await stream.close()`` or ``async with`` end it at once."""

    def __init__(self, stream: Any, step: Step, scope: AsyncStepScope) -> None:
        self._stream = stream
        self.step = step
        """The budget step of the call (``step.granted_tokens``: what an early close is charged)."""
        self._scope = scope
        self._done = False
        self._received = False
        self._iterator: AsyncIterator[Any] | None = None

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._chunks()

    async def __anext__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._chunks()
        return await anext(self._iterator)

    async def _chunks(self) -> AsyncIterator[Any]:
        error: BaseException | None = None
        try:
            async for chunk in self._stream:
                record_usage(self.step, _chunk_usage(chunk))
                self._received = True
                yield chunk
        except GeneratorExit:
            raise
        except BaseException as exc:
            error = exc
            _charge_if_streamed(self.step, self._received)
            raise
        finally:
            await self._finish(error)

    async def _finish(self, error: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        await self._stream.close()
        await self._scope.__aexit__(type(error) if error else None, error, error.__traceback__ if error else None)

    async def close(self) -> None:
        await self._finish(None)

    async def __aenter__(self) -> AsyncBudgetedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


# --- the wrapped endpoints ------------------------------------------------------------------------------------------


class _Endpoint:
    """``create`` of one endpoint (``chat.completions`` or ``responses``) as a budget step."""

    def __init__(self, owner: BudgetedOpenAI, endpoint: str, resource: Any) -> None:
        self._owner = owner
        self._endpoint = endpoint
        self._resource = resource
        self._create = resource.create

    def __getattr__(self, name: str) -> Any:  # the resource's other methods, unbudgeted
        return getattr(self._resource, name)

    def create(self, *, budget_step_id: str | None = None, budget_task_id: str | None = None, **kwargs: Any) -> Any:
        """The SDK's ``create``, checked before and reported after. ``budget_step_id``: the step's id (default: a
        new one per call); ``budget_task_id``: the task's (default: the wrapper's)."""
        call = _Call(self._endpoint, kwargs)
        owner = self._owner
        scope = owner.budget.step(
            budget_task_id or owner.task_id,
            budget_step_id or new_step_id(),
            **call.step_arguments(),
            **owner.step_options,
        )
        step = scope.__enter__()  # CHECKPOINT and DENY raise here, before any request
        try:
            send = call.apply(step)
            call.force_usage_chunk(send)
            result = self._create(**send)
        except BaseException as error:
            scope.__exit__(type(error), error, error.__traceback__)  # nothing spent: the reservation is released
            raise
        if send.get("stream"):
            return BudgetedStream(result, step, scope)
        record_usage(step, _get(result, "usage"))
        scope.__exit__(None, None, None)
        return result


class _AsyncEndpoint:
    """The asyncio twin of ``_Endpoint``."""

    def __init__(self, owner: AsyncBudgetedOpenAI, endpoint: str, resource: Any) -> None:
        self._owner = owner
        self._endpoint = endpoint
        self._resource = resource
        self._create = resource.create

    def __getattr__(self, name: str) -> Any:
        return getattr(self._resource, name)

    async def create(
        self, *, budget_step_id: str | None = None, budget_task_id: str | None = None, **kwargs: Any
    ) -> Any:
        """See ``BudgetedOpenAI.chat.completions.create``."""
        call = _Call(self._endpoint, kwargs)
        owner = self._owner
        scope = owner.budget.step(
            budget_task_id or owner.task_id,
            budget_step_id or new_step_id(),
            **call.step_arguments(),
            **owner.step_options,
        )
        step = await scope.__aenter__()
        try:
            send = call.apply(step)
            call.force_usage_chunk(send)
            result = await self._create(**send)
        except BaseException as error:
            await scope.__aexit__(type(error), error, error.__traceback__)
            raise
        if send.get("stream"):
            return AsyncBudgetedStream(result, step, scope)
        record_usage(step, _get(result, "usage"))
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
    """An ``openai.OpenAI`` whose ``chat.completions.create`` and ``responses.create`` are budget steps of
    ``task_id``; every other attribute is the client's own (unbudgeted). ``step_options``: further arguments of every
    ``budget.step`` (``labels``, ``task_type``, ``lease_seconds``, ``task_ceiling_tokens``)."""

    def __init__(self, client: openai.OpenAI, budget: Budget, *, task_id: str, **step_options: Any) -> None:
        self.client = client
        self.budget = budget
        self.task_id = task_id
        self.step_options = step_options
        self.chat = _Chat(client.chat, _Endpoint(self, "chat", client.chat.completions))
        self.responses = _Endpoint(self, "responses", client.responses)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


class AsyncBudgetedOpenAI:
    """The asyncio twin of :class:`BudgetedOpenAI`, for ``openai.AsyncOpenAI`` and an ``AsyncBudget``."""

    def __init__(self, client: openai.AsyncOpenAI, budget: AsyncBudget, *, task_id: str, **step_options: Any) -> None:
        self.client = client
        self.budget = budget
        self.task_id = task_id
        self.step_options = step_options
        self.chat = _Chat(client.chat, _AsyncEndpoint(self, "chat", client.chat.completions))
        self.responses = _AsyncEndpoint(self, "responses", client.responses)

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
    """``client`` with every ``chat.completions.create`` and ``responses.create`` a step of ``task_id`` under
    ``budget``: an ``OpenAI`` with a ``Budget``, or an ``AsyncOpenAI`` with an ``AsyncBudget``."""
    if isinstance(client, openai.AsyncOpenAI) and isinstance(budget, AsyncBudget):
        return AsyncBudgetedOpenAI(client, budget, task_id=task_id, **step_options)
    if isinstance(client, openai.OpenAI) and isinstance(budget, Budget):
        return BudgetedOpenAI(client, budget, task_id=task_id, **step_options)
    raise TypeError("budgeted() takes an OpenAI client with a Budget, or an AsyncOpenAI client with an AsyncBudget")
