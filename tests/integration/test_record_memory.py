"""A reservation record stays in Valkey's compact listpack encoding on the server the sidecar runs (the embedded one,
and k8s/base/redis.yaml's): its `scopes` field is longer than Valkey's default hash-max-listpack-value of 64, past
which a record takes a hashtable of about twice the memory (docs/storage.md)."""

from __future__ import annotations

import redis

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
