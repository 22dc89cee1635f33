"""A reservation record stays in Valkey's compact listpack encoding on the server the sidecar runs (the embedded one,
and k8s/base/redis.yaml's): its `scopes` field is longer than Valkey's default hash-max-listpack-value of 64, past
which a record takes a hashtable of about twice the memory (docs/storage.md)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import redis

from budgetwarden.store import HASH_MAX_LISTPACK_VALUE
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import BudgetClient

from support import TEST_RPC_TIMEOUT_S, RunningSidecar

LONG_TENANT = "an-organisation-with-a-long-tenant-id-of-sixty-four-characters-x"


def test_a_reservation_record_is_a_listpack_though_its_scopes_pass_the_default_limit(
    sidecar: RunningSidecar, sync_redis: redis.Redis
) -> None:
    assert len(LONG_TENANT) == 64
    with BudgetClient(sidecar.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        answer = client.check(tenant_id=LONG_TENANT, task_id="t1", step_id="s1", estimated_input_tokens=100)
    assert answer.decision == pb.DECISION_ALLOW
    (record,) = [key for key in sync_redis.scan_iter(match="bw1:*:resv:*") if b":resv:s" not in key]
    scopes = sync_redis.hget(record, "scopes")
    assert scopes is not None
    assert len(scopes) > 64, "the record's scopes would fit Valkey's default: this test would prove nothing"
    assert sync_redis.object("encoding", record) == b"listpack"


ADVICE = "every reservation record has a longer one"


def test_a_sidecar_on_a_redis_with_the_default_limit_says_what_to_set(
    start_sidecar: Callable[..., RunningSidecar], sync_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    sync_redis.config_set("hash-max-listpack-value", 64)  # what an external Redis has unless set
    try:
        with caplog.at_level(logging.WARNING, logger="budgetwarden.server"):
            start_sidecar()
    finally:
        sync_redis.config_set("hash-max-listpack-value", HASH_MAX_LISTPACK_VALUE)
    (advice,) = [r.getMessage() for r in caplog.records if ADVICE in r.getMessage()]
    assert "at most 64 bytes" in advice
    assert f"set hash-max-listpack-value {HASH_MAX_LISTPACK_VALUE}" in advice


def test_a_sidecar_on_a_redis_set_as_advised_says_nothing(
    start_sidecar: Callable[..., RunningSidecar], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="budgetwarden.server"):
        start_sidecar()
    assert not [r for r in caplog.records if ADVICE in r.getMessage()]
