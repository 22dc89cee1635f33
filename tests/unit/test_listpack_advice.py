"""What the sidecar reads of an external server's hash-max-listpack-value, and when it tells the operator to set it
(app/_redis_clients.py; the server itself in tests/integration/test_record_memory.py)."""

from __future__ import annotations

from typing import Any

import pytest

from budgetwarden.app._redis_clients import _config_values, listpack_advice
from budgetwarden.store import HASH_MAX_LISTPACK_VALUE


@pytest.mark.parametrize(
    ("reply", "values"),
    [
        ({"hash-max-listpack-value": "64"}, ["64"]),
        ({b"hash-max-listpack-value": b"64"}, ["64"]),
        ({"127.0.0.1:7000": {"hash-max-listpack-value": "64"}, "127.0.0.1:7001": {"hash-max-listpack-value": "1024"}},
         ["64", "1024"]),
        ({}, []),  # an older Redis names it hash-max-ziplist-value: nothing to read
        ("not a dict", []),
    ],
)  # fmt: skip
def test_config_values_are_read_from_each_reply_shape(reply: Any, values: list[str]) -> None:
    assert _config_values(reply) == values


def test_advice_only_when_no_record_can_be_a_listpack() -> None:
    advice = listpack_advice(64)
    assert advice is not None
    assert f"set hash-max-listpack-value {HASH_MAX_LISTPACK_VALUE}" in advice
    assert listpack_advice(128) is None  # a short tenant's records fit: the operator chose it
    assert listpack_advice(HASH_MAX_LISTPACK_VALUE) is None
    assert listpack_advice(None) is None  # CONFIG disabled: nothing known, nothing said
