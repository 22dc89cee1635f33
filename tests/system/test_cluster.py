"""The same scripts on a real Redis Cluster (three Valkey nodes started by the test), through the gRPC API."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from budgetwarden.store._store import REPORT_BATCH
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import BudgetClient

from support import TEST_RPC_TIMEOUT_S, RunningSidecar
from support_cluster import Cluster


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), primaries=3)
    yield cluster.url
    cluster.stop()


def test_tenants_spread_over_nodes_and_scripts_run_unchanged(
    start_sidecar: Callable[..., RunningSidecar], cluster_url: str
) -> None:
    running = start_sidecar(redis_url=cluster_url, redis_cluster=True)
    tenants = [f"tenant-{i}" for i in range(12)]
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        for tenant in tenants:
            answer = client.check(tenant_id=tenant, task_id="t", step_id="s1", estimated_input_tokens=100)
            assert answer.decision == pb.DECISION_ALLOW, answer.message
            assert client.check(tenant_id=tenant, task_id="t", step_id="s1", estimated_input_tokens=100).replayed
            denied = client.check(tenant_id=tenant, task_id="t", step_id="big", estimated_input_tokens=300_000)
            assert denied.decision == pb.DECISION_DENY
        # One Report batch spans tenants, hence hash slots and nodes: the pipeline is split per node.
        records = [
            pb.UsageRecord(tenant_id=tenant, task_id="t", step_id="s1", input_tokens=60, idempotency_key="k")
            for tenant in tenants
        ]
        statuses = [result.status for result in client.report(records).results]
        assert statuses == [pb.REPORT_STATUS_APPLIED] * len(tenants)
        statuses = [result.status for result in client.report(records).results]
        assert statuses == [pb.REPORT_STATUS_DUPLICATE] * len(tenants)
        for tenant in tenants:
            budget = client.get_budget(tenant_id=tenant, task_id="t")
            task = next(scope for scope in budget.scopes if scope.name == "task")
            assert (task.used_tokens, task.reserved_tokens) == (60, 0)
            release = client.release(tenant_id=tenant, task_id="t", step_id="s1")
            assert release.status == pb.RELEASE_STATUS_ALREADY_REPORTED
    cluster = redis.RedisCluster.from_url(cluster_url)
    try:
        nodes_with_keys = [node for node in cluster.get_primaries() if cluster.dbsize(target_nodes=node)]
        assert len(nodes_with_keys) > 1  # the tenants really are on different nodes
    finally:
        cluster.close()


def test_report_batches_of_a_tenant_apply_in_order(
    start_sidecar: Callable[..., RunningSidecar], cluster_url: str
) -> None:
    """More records of one tenant than one script call takes: the calls run one after another, so the first record
    with a key is the one applied and its retries later in the same report are duplicates."""
    running = start_sidecar(redis_url=cluster_url, redis_cluster=True)
    size = 2 * REPORT_BATCH + 10
    records = [
        pb.UsageRecord(tenant_id="ordered", task_id="t", step_id=f"s{i}", input_tokens=1 + i, idempotency_key=f"k{i}")
        for i in range(size)
    ]
    for retry in (REPORT_BATCH + 50, 2 * REPORT_BATCH + 5):
        records[retry] = records[0]  # the first record sent again (another record under its key is ALREADY_EXISTS)
    cluster = redis.RedisCluster.from_url(cluster_url)
    try:
        # Without the scripts cached, each call's first EVALSHA fails and is sent again: calls that overlapped would
        # land out of order.
        cluster.script_flush()  # on every primary
    finally:
        cluster.close()
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        results = client.report(records).results
        budget = client.get_budget(tenant_id="ordered", task_id="t")

    statuses = [result.status for result in results]
    assert statuses[0] == pb.REPORT_STATUS_UNRESERVED
    assert statuses[REPORT_BATCH + 50] == statuses[2 * REPORT_BATCH + 5] == pb.REPORT_STATUS_DUPLICATE
    applied = [record for record, status in zip(records, statuses, strict=True) if status != pb.REPORT_STATUS_DUPLICATE]
    task = next(scope for scope in budget.scopes if scope.name == "task")
    assert task.used_tokens == sum(record.input_tokens for record in applied)
