"""When the sidecar tells the operator of an external server to set hash-max-listpack-value (app/_redis_clients.py;
reading it from the real server: tests/integration/test_record_memory.py)."""

from __future__ import annotations

from budgetwarden.app._redis_clients import listpack_advice
from budgetwarden.store import HASH_MAX_LISTPACK_VALUE


def test_advice_only_when_no_record_can_be_a_listpack() -> None:
    advice = listpack_advice(64)
    assert advice is not None
    assert f"set hash-max-listpack-value {HASH_MAX_LISTPACK_VALUE}" in advice
    assert listpack_advice(128) is None  # a short tenant's records fit: the operator chose it
    assert listpack_advice(HASH_MAX_LISTPACK_VALUE) is None
    assert listpack_advice(None) is None  # CONFIG disabled: nothing known, nothing said
