"""How values travel between Python and the Lua scripts (store/_codec.py): one place for every script and reply."""

from __future__ import annotations

import pytest

from budgetwarden.domain import Counter, Thresholds
from budgetwarden.store._codec import (
    ANSWER_SEPARATOR,
    FIELD_SEPARATOR,
    NONE,
    field_text,
    limit_arg,
    optional,
    read_counters,
    read_thresholds,
    reply_text,
)


@pytest.mark.parametrize(
    ("text", "sent"),
    [
        ("research", "research"),
        ("", ""),
        (f"a{FIELD_SEPARATOR}b{ANSWER_SEPARATOR}c\nd\x00", "a?b?c?d?"),
        ("ünï 🙂\u202e\x7f", "ünï 🙂\u202e\x7f"),  # not printable, but no separator: kept as it is
    ],
)
def test_policy_text_never_splits_an_argument(text: str, sent: str) -> None:
    assert field_text(text) == sent


def test_no_limit_travels_as_none_and_comes_back_as_none() -> None:
    assert [limit_arg(None), limit_arg(0), limit_arg(7)] == [NONE, 0, 7]
    assert [optional(NONE), optional("-1"), optional(b"12"), optional(0)] == [None, None, 12, 0]


def test_replies_decode_to_text_counters_and_thresholds() -> None:
    assert [reply_text(b"ck1.x"), reply_text("s"), reply_text(3)] == ["ck1.x", "s", "3"]
    flat = [1000, 10, 20, NONE, 5, 6, NONE, 0, 0, 3_000_000, 1, 2]
    assert read_counters(flat) == (
        Counter(limit=1000, used=10, reserved=20, limit_usd=None, used_usd=5, reserved_usd=6),
        Counter(limit=None, used=0, reserved=0, limit_usd=3_000_000, used_usd=1, reserved_usd=2),
    )
    assert read_thresholds(b"8000", NONE) == Thresholds(8000, None)
