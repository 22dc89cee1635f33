"""Redis behind Sentinel (issue 16): the sidecar follows a failover to the promoted replica, and ``--durability
replicas`` acknowledges a write only once a replica holds it, so a failover loses no acknowledged report. Without it,
Redis replicates asynchronously and an acknowledged report can vanish with the primary: the second test shows it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from budgetwarden_client import BudgetClient, pb

from support import FAST_WATCH, RunningSidecar
from support_sentinel import SentinelGroup, wait_until

pytestmark = pytest.mark.slow

TENANT, TASK = "acme", "t1"
RPC_TIMEOUT_S = 60.0


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    started = SentinelGroup(tmp_path / "sentinel-group")
    yield started
    started.stop()


@pytest.fixture
def sentinel_sidecar(
    group: SentinelGroup, start_sidecar: Callable[..., RunningSidecar]
) -> Callable[..., RunningSidecar]:
    def start(**overrides: object) -> RunningSidecar:
        return start_sidecar(redis_url=group.url, fail_mode="closed", **FAST_WATCH, **overrides)

    return start


def report(client: BudgetClient, step: str, tokens: int) -> int:
    """The report's status, or the gRPC code's negative when the call itself failed."""
    record = pb.UsageRecord(tenant_id=TENANT, task_id=TASK, step_id=step, input_tokens=tokens)
    try:
        (result,) = client.report([record]).results
    except grpc.RpcError as exc:
        return -exc.code().value[0]  # type: ignore[attr-defined, no-any-return]
    return int(result.status)


def task_used(client: BudgetClient) -> int:
    answer = client.get_budget(tenant_id=TENANT, task_id=TASK)
    (task,) = [scope for scope in answer.scopes if scope.name == "task"]
    return int(task.used_tokens)


def answers_reads(client: BudgetClient) -> bool:
    try:
        client.get_budget(tenant_id=TENANT, task_id=TASK)
    except grpc.RpcError:
        return False
    return True


def allowed_by_the_store(client: BudgetClient, step: str) -> bool:
    answer = client.check(tenant_id=TENANT, task_id=TASK, step_id=step, estimated_input_tokens=10)
    return answer.decision == pb.DECISION_ALLOW and not answer.from_fail_mode


def ready(addr: str) -> bool:
    with grpc.insecure_channel(addr) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def test_the_sidecar_follows_a_failover_to_the_promoted_replica(
    group: SentinelGroup, sentinel_sidecar: Callable[..., RunningSidecar]
) -> None:
    running = sentinel_sidecar()
    with BudgetClient(running.addr, timeout=RPC_TIMEOUT_S) as client:
        assert allowed_by_the_store(client, "before")
        assert report(client, "before", 1000) > 0
        assert group.primary.client().wait(1, 60_000) == 1  # the replica holds everything so far

        group.fail_over_by_killing_the_primary()

        wait_until(lambda: allowed_by_the_store(client, "after"), "a check is decided by the new master")
        assert task_used(client) == 1000  # the replicated report survived
        assert group.replica.client().dbsize() > 0
        wait_until(lambda: ready(running.addr), "readiness is SERVING again")


def test_without_replica_durability_an_acknowledged_report_can_vanish_in_a_failover(
    group: SentinelGroup, sentinel_sidecar: Callable[..., RunningSidecar]
) -> None:
    running = sentinel_sidecar()
    with BudgetClient(running.addr, timeout=RPC_TIMEOUT_S) as client:
        assert allowed_by_the_store(client, "s1")
        group.cut_replication()
        assert report(client, "s1", 700) > 0  # acknowledged by the primary alone
        group.fail_over_by_killing_the_primary()  # before the replica got it
        wait_until(lambda: allowed_by_the_store(client, "s2"), "a check is decided by the new master")
        assert task_used(client) == 0  # the acknowledged 700 tokens are gone


def test_replica_durability_acknowledges_only_what_a_replica_holds_and_a_failover_keeps_it(
    group: SentinelGroup, sentinel_sidecar: Callable[..., RunningSidecar]
) -> None:
    running = sentinel_sidecar(durability="replicas", durability_replicas=1)
    with BudgetClient(running.addr, timeout=RPC_TIMEOUT_S) as client:
        assert allowed_by_the_store(client, "s1")
        group.cut_replication()
        assert report(client, "s1", 700) == -grpc.StatusCode.UNAVAILABLE.value[0]  # not acknowledged: retry it
        group.restore_replication()
        wait_until(lambda: report(client, "s1", 700) > 0, "the retried report is acknowledged")
        group.fail_over_by_killing_the_primary()
        # The promoted replica has no replica of its own: writes wait for one, so reads are what can be checked now.
        # Every sentinel may not call it the master yet ("No master found"): wait until a read is answered.
        wait_until(lambda: answers_reads(client), "a budget read is answered by the new master")
        assert task_used(client) == 700
        assert report(client, "s2", 5) == -grpc.StatusCode.UNAVAILABLE.value[0]
