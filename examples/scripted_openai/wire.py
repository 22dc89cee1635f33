"""The JSON the OpenAI API sends: chat completions (whole and as chunks) and Responses (whole and as events)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .script import Answer, RecordedRequest, Usage

# Streamed text arrives a word at a time, tool call arguments a few characters at a time, as the API splits them.
_WORD = re.compile(r"\s*\S+\s*|\s+")
ARGUMENT_PIECE_CHARS = 8


def text_pieces(text: str) -> list[str]:
    return _WORD.findall(text) or [""]


def argument_pieces(arguments: str) -> list[str]:
    return [arguments[i : i + ARGUMENT_PIECE_CHARS] for i in range(0, len(arguments), ARGUMENT_PIECE_CHARS)] or [""]


@dataclass(frozen=True, kw_only=True)
class Served:
    """One answer with the identities the server gave it."""

    id: str
    created: int
    request: RecordedRequest
    answer: Answer
    call_ids: tuple[str, ...]  # one per tool call
    item_ids: tuple[str, ...]  # Responses: one per tool call (fc_...), then the message (msg_...)


def error_body(message: str, *, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# Chat completions


def chat_usage(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": usage.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chat_tool_calls(served: Served) -> list[dict[str, Any]]:
    return [
        {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json}}
        for call, call_id in zip(served.answer.tool_calls, served.call_ids, strict=True)
    ]


def chat_completion(served: Served) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": served.answer.text, "refusal": None}
    if served.answer.tool_calls:
        message["tool_calls"] = _chat_tool_calls(served)
    return {
        "id": served.id,
        "object": "chat.completion",
        "created": served.created,
        "model": served.request.model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": served.answer.finish_reason}],
        "usage": chat_usage(served.answer.usage),
    }


def chat_chunks(served: Served, *, include_usage: bool) -> Iterator[dict[str, Any]]:
    """The chunks of a streamed completion; with ``include_usage`` every chunk carries ``usage: null`` and a last
    chunk with no choices carries the usage, as the API does."""

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": served.id,
            "object": "chat.completion.chunk",
            "created": served.created,
            "model": served.request.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            body["usage"] = None
        return body

    answer = served.answer
    yield chunk({"role": "assistant", "content": "" if answer.text is not None else None, "refusal": None})
    if answer.text:
        for piece in text_pieces(answer.text):
            yield chunk({"content": piece})
    for index, (call, call_id) in enumerate(zip(answer.tool_calls, served.call_ids, strict=True)):
        opening = {"index": index, "id": call_id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        yield chunk({"tool_calls": [opening]})
        for piece in argument_pieces(call.arguments_json):
            yield chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    yield chunk({}, answer.finish_reason)
    if include_usage:
        last = chunk({})
        last["choices"] = []
        last["usage"] = chat_usage(answer.usage)
        yield last


# Responses


def responses_usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def _status(served: Served) -> tuple[str, dict[str, Any] | None]:
    reason = served.answer.finish_reason
    if reason in ("stop", "tool_calls"):
        return "completed", None
    return "incomplete", {"reason": "max_output_tokens" if reason == "length" else reason}


def _output_items(served: Served, *, done: bool) -> list[dict[str, Any]]:
    """Function calls first, then the message (if any text): the final items, or as first added (``done=False``)."""
    items: list[dict[str, Any]] = []
    item_status = "completed" if done else "in_progress"
    for call, call_id, item_id in zip(served.answer.tool_calls, served.call_ids, served.item_ids, strict=False):
        items.append(
            {
                "id": item_id,
                "type": "function_call",
                "call_id": call_id,
                "name": call.name,
                "arguments": call.arguments_json if done else "",
                "status": item_status,
            }
        )
    if served.answer.text is not None or not served.answer.tool_calls:
        content = [_output_text(served.answer.text or "")] if done else []
        items.append(
            {
                "id": served.item_ids[-1],
                "type": "message",
                "role": "assistant",
                "status": item_status,
                "content": content,
            }
        )
    return items


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_object(served: Served, *, final: bool = True) -> dict[str, Any]:
    status, incomplete = _status(served) if final else ("in_progress", None)
    request = served.request
    return {
        "id": served.id,
        "object": "response",
        "created_at": served.created,
        "status": status,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "model": request.model,
        "output": _output_items(served, done=True) if final else [],
        "parallel_tool_calls": bool(request.body.get("parallel_tool_calls", True)),
        "previous_response_id": request.body.get("previous_response_id"),
        "temperature": request.body.get("temperature", 1.0),
        "tool_choice": request.body.get("tool_choice", "auto"),
        "tools": request.tools,
        "top_p": request.body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": responses_usage(served.answer.usage) if final else None,
        "metadata": request.body.get("metadata") or {},
    }


def response_events(served: Served) -> Iterator[tuple[str, dict[str, Any]]]:
    """The server-sent events of a streamed response, in the API's order, numbered by ``sequence_number``."""
    sequence = 0

    def event(type_: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        nonlocal sequence
        sequence += 1
        return type_, {"type": type_, "sequence_number": sequence - 1, **fields}

    yield event("response.created", response=response_object(served, final=False))
    yield event("response.in_progress", response=response_object(served, final=False))
    added, done = _output_items(served, done=False), _output_items(served, done=True)
    for index, (first, last) in enumerate(zip(added, done, strict=True)):
        item_id = first["id"]
        yield event("response.output_item.added", output_index=index, item=first)
        if first["type"] == "function_call":
            for piece in argument_pieces(last["arguments"]):
                yield event("response.function_call_arguments.delta", item_id=item_id, output_index=index, delta=piece)
            yield event(
                "response.function_call_arguments.done",
                item_id=item_id,
                output_index=index,
                name=last["name"],
                arguments=last["arguments"],
            )
        else:
            text = last["content"][0]["text"]
            where = {"item_id": item_id, "output_index": index, "content_index": 0}
            yield event("response.content_part.added", **where, part=_output_text(""))
            for piece in text_pieces(text) if text else []:
                yield event("response.output_text.delta", **where, delta=piece, logprobs=[])
            yield event("response.output_text.done", **where, text=text, logprobs=[])
            yield event("response.content_part.done", **where, part=_output_text(text))
        yield event("response.output_item.done", output_index=index, item=last)
    final = response_object(served)
    yield event("response.completed" if final["status"] == "completed" else "response.incomplete", response=final)


def prompt_messages_of(request: RecordedRequest) -> Sequence[dict[str, Any]]:
    """The messages whose tokens make the prompt: Responses ``instructions`` count as a system message."""
    if request.instructions is None:
        return request.messages
    return [{"role": "system", "content": request.instructions}, *request.messages]
