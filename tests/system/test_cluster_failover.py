"""Redis Cluster failover (issue 16): a primary with a replica is killed, the cluster promotes the replica, and the
sidecar follows the new topology without a restart; no check is granted beyond the ceiling across it; and with
``--durability replicas`` a report is acknowledged only once the primary's replica holds it, so the failover keeps
it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from budgetwarden.store import TenantKeys
from budgetwarden_client import BudgetClient, pb

from support import FAST_WATCH, RunningSidecar
from support_cluster import FAILOVER_NODE_TIMEOUT_MS, Cluster, slot_owner, wait_until

pytestmark = pytest.mark.slow

TENANT = "acme"
RPC_TIMEOUT_S = 60.0
CEILING = 1000  # the task's tokens; each check asks for STEP_TOKENS
STEP_TOKENS = 100


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three primaries; the one owning the tenant's slot has a replica."""
    owner = slot_owner(TenantKeys(TENANT).leases, 3)
    started = Cluster(tmp_path / "cluster", primaries=3, replicated=[owner], node_timeout_ms=FAILOVER_NODE_TIMEOUT_MS)
    yield started
    started.stop()


@pytest.fixture
def cluster_sidecar(cluster: Cluster, start_sidecar: Callable[..., RunningSidecar]) -> Callable[..., RunningSidecar]:
    def start(**overrides: object) -> RunningSidecar:
        return start_sidecar(redis_url=cluster.url, redis_cluster=True, fail_mode="closed", **FAST_WATCH, **overrides)

    return start


def check(client: BudgetClient, task: str, step: str) -> pb.CheckResponse:
    return client.check(
        tenant_id=TENANT,
        task_id=task,
        step_id=step,
        estimated_input_tokens=STEP_TOKENS,
        max_output_tokens=0,
        task_ceiling_tokens=CEILING,
    )


def granted_by_the_store(client: BudgetClient, task: str, step: str) -> bool:
    answer = check(client, task, step)
    return answer.decision == pb.DECISION_ALLOW and not answer.from_fail_mode


def report(client: BudgetClient, task: str, step: str, tokens: int) -> int:
    """The report's status, or the gRPC code's negative when the call itself failed."""
    record = pb.UsageRecord(tenant_id=TENANT, task_id=task, step_id=step, input_tokens=tokens, idempotency_key=step)
    try:
        (result,) = client.report([record]).results
    except grpc.RpcError as exc:
        return -exc.code().value[0]  # type: ignore[attr-defined, no-any-return]
    return int(result.status)


def task_scope(client: BudgetClient, task: str) -> pb.ScopeState:
    answer = client.get_budget(tenant_id=TENANT, task_id=task)
    (scope,) = [scope for scope in answer.scopes if scope.name == "task"]
    return scope


def answers_reads(client: BudgetClient, task: str) -> bool:
    try:
        task_scope(client, task)
    except grpc.RpcError:
        return False
    return True


def test_the_sidecar_follows_a_cluster_failover_without_overspend(
    cluster: Cluster, cluster_sidecar: Callable[..., RunningSidecar]
) -> None:
    running = cluster_sidecar()
    owner = next(iter(cluster.replica_of))
    with BudgetClient(running.addr, timeout=RPC_TIMEOUT_S) as client:
        for n in range(4):
            assert granted_by_the_store(client, "t1", f"before-{n}")
        with cluster.primaries[owner].client() as primary:
            assert primary.wait(1, 60_000) == 1  # the replica holds every reservation so far

        cluster.fail_over_by_killing(owner)

        wait_until(lambda: granted_by_the_store(client, "t1", "after-0"), "a check is decided by the new primary")
        granted = 5 * STEP_TOKENS
        # The rest of the ceiling and no more: the reservations made before the kill survived it.
        for n in range(1, 20):
            answer = check(client, "t1", f"after-{n}")
            assert not answer.from_fail_mode
            granted += answer.granted_tokens if answer.decision == pb.DECISION_ALLOW else 0
        assert granted == CEILING
        scope = task_scope(client, "t1")
        assert scope.used_tokens + scope.reserved_tokens == CEILING


def test_without_replica_durability_an_acknowledged_report_can_vanish_in_a_cluster_failover(
    cluster: Cluster, cluster_sidecar: Callable[..., RunningSidecar]
) -> None:
    running = cluster_sidecar()
    owner = next(iter(cluster.replica_of))
    with BudgetClient(running.addr, timeout=RPC_TIMEOUT_S) as client:
        assert granted_by_the_store(client, "t1", "s1")
        cluster.cut_replication(owner)
        assert report(client, "t1", "s1", 70) > 0  # acknowledged by the primary alone
        cluster.fail_over_by_killing(owner)  # before the replica got it
        wait_until(lambda: granted_by_the_store(client, "t1", "s2"), "a check is decided by the new primary")
        assert task_scope(client, "t1").used_tokens == 0  # the acknowledged 70 tokens are gone


def test_replica_durability_on_a_cluster_acknowledges_only_what_a_replica_holds_and_a_failover_keeps_it(
    cluster: Cluster, cluster_sidecar: Callable[..., RunningSidecar]
) -> None:
    running = cluster_sidecar(durability="replicas", durability_replicas=1)
    owner = next(iter(cluster.replica_of))
    with BudgetClient(running.addr, timeout=RPC_TIMEOUT_S) as client:
        assert granted_by_the_store(client, "t1", "s1")
        cluster.cut_replication(owner)
        assert report(client, "t1", "s1", 70) == -grpc.StatusCode.UNAVAILABLE.value[0]  # not acknowledged: retry it
        cluster.restore_replication(owner)
        wait_until(lambda: report(client, "t1", "s1", 70) > 0, "the retried report is acknowledged")
        cluster.fail_over_by_killing(owner)
        # The promoted replica has no replica of its own: writes wait for one, so reads are what can be checked now.
        wait_until(lambda: answers_reads(client, "t1"), "a budget read is answered by the new primary")
        assert task_scope(client, "t1").used_tokens == 70
        assert report(client, "t1", "s2", 5) == -grpc.StatusCode.UNAVAILABLE.value[0]
