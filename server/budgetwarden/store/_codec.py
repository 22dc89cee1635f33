"""How values travel between Python and the Lua scripts: the fields of an argument, "no limit", and the replies."""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import islice
from typing import Any

from budgetwarden.domain import Counter, Thresholds

# "No limit" (and "no threshold") in an argument or a reply: the scripts hold integers only.
NONE = -1
# Separates the fields of one check's or usage record's argument: ids are validated to hold no control characters.
FIELD_SEPARATOR = "\x1f"
# Joins the fields of a check's stored answer (store/_replay.py; lua/check.lua joins its parts with it too).
ANSWER_SEPARATOR = "\x1e"
_CONTROL = re.compile("[\x00-\x1f]")


def field_text(text: str) -> str:
    """Policy-made text (a task type, rung or model name) in an argument: a control character would split it, so it
    becomes ``?``. Checks cost a few microseconds: the common case (nothing to replace) is one test."""
    return text if text.isprintable() else _CONTROL.sub("?", text)


def limit_arg(limit: int | None) -> int:
    return NONE if limit is None else limit


def optional(value: Any) -> int | None:
    """A reply's (or a stored answer's) integer, None for NONE."""
    number = int(value)
    return None if number == NONE else number


def reply_text(value: Any) -> str:
    """A reply's string: the client hands bytes over unless it decodes responses."""
    return value.decode() if isinstance(value, bytes) else str(value)


def read_counters(flat: Sequence[Any], start: int = 0) -> tuple[Counter, ...]:
    """Counters from a flat reply of (limit, used, reserved, limit_usd, used_usd, reserved_usd) per scope, from
    ``start`` on. The script returns integers, which the client hands over as ints."""
    figures = islice(flat, start, None)
    # Six at a time from one iterator (unpacked, not indexed: once per scope of every check); strict: a reply cut
    # short in a scope is a ValueError.
    return tuple(
        [
            Counter(
                limit=None if limit == NONE else int(limit),
                used=int(used),
                reserved=int(reserved),
                limit_usd=None if limit_usd == NONE else int(limit_usd),
                used_usd=int(used_usd),
                reserved_usd=int(reserved_usd),
            )
            for limit, used, reserved, limit_usd, used_usd, reserved_usd in zip(
                figures, figures, figures, figures, figures, figures, strict=True
            )
        ]
    )


def read_thresholds(soft_bp: Any, checkpoint_bp: Any) -> Thresholds:
    return Thresholds(optional(soft_bp), optional(checkpoint_bp))
