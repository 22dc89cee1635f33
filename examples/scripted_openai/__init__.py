"""A scripted, offline OpenAI-compatible HTTP server for tests and the demo agent.

It serves ``POST /v1/chat/completions`` (whole and streamed, with the final usage chunk of
``stream_options.include_usage``), ``POST /v1/responses`` (whole and streamed events) and ``GET /v1/models`` on
127.0.0.1, answering from scripted :class:`Reply` objects with deterministic usage (see :mod:`.script` for the
counting rule). No network, no keys. See docs/development.md.
"""

from .script import (
    RecordedRequest,
    Reply,
    Responder,
    ToolCall,
    count_message_tokens,
    count_prompt_tokens,
    count_text_tokens,
)
from .server import ScriptedOpenAI

__all__ = [
    "RecordedRequest",
    "Reply",
    "Responder",
    "ScriptedOpenAI",
    "ToolCall",
    "count_message_tokens",
    "count_prompt_tokens",
    "count_text_tokens",
]
