"""OpenAI-format chat messages (and tool schemas) as the ``ChatPrompt`` of a ``CheckRequest``.

The proto carries each message as role, text content and name, and the sidecar counts them with the model's encoding.
What has no text of its own is sent as text that counts about right, and the prompt is then marked approximate:

- text parts (``text``, ``input_text``, ``output_text``, ``refusal``) are joined with newlines;
- an image part counts as ``IMAGE_TOKENS`` tokens (``IMAGE_TOKENS_LOW`` with ``detail: "low"``), sent as that many
  one-token placeholder words: OpenAI's price of a 1024x1024 image at high detail, 85 + 4 tiles x 170 (approximate);
- any other part (audio, files, ...) is sent as its JSON (approximate);
- an assistant's ``tool_calls`` (and the legacy ``function_call``) count as ``name(arguments)``, one line per call;
- a ``tool`` (or ``function``) message's result is its content, like any other message;
- ``tools=`` schemas are sent as one extra message of role ``tools`` holding their JSON (approximate: the providers
  render them in a format of their own).

A message may be a dict, an SDK object with ``model_dump()`` (OpenAI's pydantic types), or any object with ``role`` and
``content`` attributes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from budgetwarden_api.v1 import budget_pb2 as pb

IMAGE_TOKENS = 765
"""Tokens counted for an image part (OpenAI's high-detail price of a 1024x1024 image)."""
IMAGE_TOKENS_LOW = 85
"""Tokens counted for an image part with ``detail: "low"`` (OpenAI's flat low-detail price)."""
# One token per repetition in cl100k_base (tests/integration/test_step_api.py checks the sidecar's count).
_IMAGE_WORD = " image"

_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})

# What is read from an object that is neither a mapping, nor has model_dump() or a __dict__ (slotted classes).
_ATTRIBUTES = (
    "role",
    "content",
    "name",
    "tool_calls",
    "function_call",
    "tool_call_id",
    "type",
    "text",
    "refusal",
    "function",
    "arguments",
    "image_url",
    "detail",
)

Message = Mapping[str, Any] | Any
"""A chat message: a dict, an SDK object with ``model_dump()``, or an object with ``role``/``content`` attributes."""


@dataclass(frozen=True)
class ConvertedPrompt:
    prompt: pb.ChatPrompt
    approximate: bool
    """True when something was sent as a stand-in (images, other parts, tool schemas)."""


def as_dict(value: Any) -> dict[str, Any]:
    """A message or part as a plain dict, whatever it came as."""
    if isinstance(value, Mapping):
        return dict(value)
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        dumped = dump(exclude_none=True)
        if isinstance(dumped, Mapping):
            return dict(dumped)
    if hasattr(value, "__dict__"):
        return {k: v for k, v in vars(value).items() if not k.startswith("_") and v is not None}
    return {name: getattr(value, name) for name in _ATTRIBUTES if getattr(value, name, None) is not None}


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _image_tokens(part: Mapping[str, Any]) -> int:
    image = part.get("image_url")
    detail = part.get("detail") or (image.get("detail") if isinstance(image, Mapping) else None)
    return IMAGE_TOKENS_LOW if detail == "low" else IMAGE_TOKENS


def _content_text(content: Any) -> tuple[str, bool]:
    """A message's content as text, and whether some of it is a stand-in."""
    if content is None:
        return "", False
    if isinstance(content, str):
        return content, False
    pieces: list[str] = []
    approximate = False
    for raw in content if isinstance(content, Iterable) else [content]:
        part = as_dict(raw) if not isinstance(raw, str) else {"type": "text", "text": raw}
        kind = part.get("type", "text")
        if kind in _TEXT_PARTS:
            pieces.append(str(part.get(_TEXT_PARTS[kind], "")))
        elif kind in _IMAGE_PARTS:
            pieces.append(_IMAGE_WORD * _image_tokens(part))
            approximate = True
        else:
            pieces.append(_json(part))
            approximate = True
    return "\n".join(pieces), approximate


def _call_text(call: Any) -> str:
    call = as_dict(call)
    function = as_dict(call.get("function") or call.get("custom") or {})
    name = function.get("name", call.get("name", ""))
    arguments = function.get("arguments", function.get("input", call.get("arguments", "")))
    if not isinstance(arguments, str):
        arguments = _json(arguments)
    return f"{name}({arguments})"


def chat_message(raw: Message, index: int) -> tuple[pb.ChatMessage, bool]:
    message = as_dict(raw)
    role = message.get("role")
    if not role or not isinstance(role, str):
        raise ValueError(f"messages[{index}] has no role")
    text, approximate = _content_text(message.get("content"))
    calls = list(message.get("tool_calls") or [])
    if message.get("function_call"):
        calls.append({"function": message["function_call"]})
    lines = [text] if text else []
    lines.extend(_call_text(call) for call in calls)
    name = message.get("name")
    return pb.ChatMessage(role=role, content="\n".join(lines), name=name if isinstance(name, str) else ""), approximate


def chat_prompt(messages: Sequence[Message], tools: Sequence[Any] | None = None) -> ConvertedPrompt:
    """``messages`` (and ``tools``) as a ChatPrompt; see the module's doc for what counts how."""
    if isinstance(messages, (str, bytes, Mapping)):
        raise TypeError("messages must be a list of chat messages")
    prompt = pb.ChatPrompt()
    approximate = False
    for index, raw in enumerate(messages):
        message, stand_in = chat_message(raw, index)
        prompt.messages.append(message)
        approximate = approximate or stand_in
    if tools:
        prompt.messages.append(pb.ChatMessage(role="tools", content=_json([as_dict(tool) for tool in tools])))
        approximate = True
    return ConvertedPrompt(prompt, approximate)


def message_chars(message: pb.ChatMessage) -> int:
    return len(message.role) + len(message.content) + len(message.name)
