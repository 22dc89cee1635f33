"""The gRPC API end to end over a real socket, against a real Redis-compatible server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from budgetwarden.store._embedded import EmbeddedRedis
from budgetwarden.store._keys import parse_fail_open_id
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_api.v1 import budget_pb2_grpc as pb_grpc
from budgetwarden_client import BudgetClient, CheckRefusedError

from support import TEST_RPC_TIMEOUT_S, BlackHole, RunningSidecar, SettableClock, free_port, sidecar_settings
from support_requests import BAD_CHECKS, BAD_RECORDS, BAD_RELEASES

STRICT_POLICY = """
unknown_tenants: reject
tenants:
  acme:
    time_zone: UTC
    windows:
      minute: {tokens: 5000}
      day: {tokens: 20000}
default_task_type: general
task_types:
  general:
    per_task: {tokens: 1000}
    per_step: {tokens: 600}
"""


@pytest.fixture
def strict(start_sidecar: Callable[..., RunningSidecar], tmp_path: Any) -> RunningSidecar:
    path = tmp_path / "policy.yaml"
    path.write_text(STRICT_POLICY)
    return start_sidecar(policy_file=path)


class StreamingClient(BudgetClient):
    """Sends every check as a one-check CheckStream message, so that each test of Check also holds for the stream."""

    def check(self, **fields: Any) -> pb.CheckResponse:
        (answer,) = self.check_many([fields])
        if isinstance(answer, CheckRefusedError):
            raise answer
        return answer


@pytest.fixture(params=["unary", "stream"])
def client(strict: RunningSidecar, request: pytest.FixtureRequest) -> Iterator[BudgetClient]:
    with (BudgetClient if request.param == "unary" else StreamingClient)(strict.addr) as c:
        yield c


@pytest.fixture(scope="module")
def strict_for_refusals(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One strict sidecar for the tests of refused input (its address): a refused request changes nothing, in Redis
    (which every test still finds flushed) or in the sidecar, so they need no sidecar of their own."""
    path = tmp_path_factory.mktemp("strict") / "policy.yaml"
    path.write_text(STRICT_POLICY)
    running = RunningSidecar(sidecar_settings(redis_server.url, policy_file=path)).start()
    yield running.addr
    running.stop()


@pytest.fixture(params=["unary", "stream"])
def refusing_client(strict_for_refusals: str, redis_url: str, request: pytest.FixtureRequest) -> Iterator[BudgetClient]:
    """Like ``client``, on the shared sidecar (``redis_url``: Redis is flushed before each test)."""
    with (BudgetClient if request.param == "unary" else StreamingClient)(strict_for_refusals) as c:
        yield c


def check(
    client: BudgetClient,
    step: str = "s1",
    tokens: int = 100,
    *,
    expect: int = pb.DECISION_ALLOW,
    fail_mode: bool = False,
    **fields: Any,
) -> pb.CheckResponse:
    """Checks a step (of task t1 of acme unless ``fields`` say otherwise) and asserts the decision the test expects,
    and that the store decided it (not the fail mode) unless ``fail_mode``."""
    values: dict[str, Any] = {"tenant_id": "acme", "task_id": "t1", "step_id": step, "estimated_input_tokens": tokens}
    values.update(fields)
    answer = client.check(**values)
    assert (pb.Decision.Name(answer.decision), answer.from_fail_mode) == (pb.Decision.Name(expect), fail_mode), answer
    return answer


def usage(step: str = "s1", tokens: int = 100, **fields: Any) -> pb.UsageRecord:
    values: dict[str, Any] = {"tenant_id": "acme", "task_id": "t1", "step_id": step, "input_tokens": tokens}
    values.update(fields)
    return pb.UsageRecord(**values)


def scopes(response: Any) -> dict[str, pb.ScopeState]:
    return {scope.name: scope for scope in response.scopes}


def test_allow_reserves_and_describes_every_scope(client: BudgetClient) -> None:
    answer = check(client, tokens=300, max_output_tokens=200, labels={"user": "u1"})
    assert answer.decision == pb.DECISION_ALLOW
    assert answer.reason == pb.REASON_WITHIN_BUDGET
    assert (answer.granted_tokens, answer.requested_tokens) == (500, 500)
    assert len(answer.reservation_id) == 32
    assert answer.HasField("lease_expires_at")
    assert not answer.from_fail_mode
    found = scopes(answer)
    assert list(found) == ["step", "task", "tenant.day", "tenant.minute"]
    task = found["task"]
    assert (task.limit_tokens, task.used_tokens, task.reserved_tokens, task.remaining_tokens) == (1000, 0, 500, 500)
    day = found["tenant.day"]
    assert day.kind == pb.SCOPE_KIND_TENANT_WINDOW
    assert day.window == pb.WINDOW_DAY
    assert day.resets_at.ToSeconds() - day.window_start.ToSeconds() == 86400
    assert found["step"].limit_tokens == 600


def test_deny_reserves_nothing_and_names_the_scope(client: BudgetClient) -> None:
    check(client, "s1", 600)
    answer = check(client, "s2", 401, expect=pb.DECISION_DENY)
    assert answer.reason == pb.REASON_TASK_BUDGET_EXHAUSTED
    assert answer.binding_scope == "task"
    assert answer.granted_tokens == 0
    assert answer.reservation_id == ""
    assert not answer.HasField("retry_after")
    assert scopes(answer)["task"].reserved_tokens == 600
    check(client, "s3", 400)  # allowed: exactly at the ceiling


def test_window_denial_says_when_to_retry(strict: RunningSidecar, client: BudgetClient) -> None:
    clock = strict.clock
    assert isinstance(clock, SettableClock)
    clock.now_ms = clock.now_ms // 60_000 * 60_000 + 45_000  # 15 s before its minute ends; the clock stands still
    for i in range(5):  # five tasks of 1000 fill the 5000-token minute window
        check(client, "s", 600, task_id=f"w{i}")
        check(client, "s2", 400, task_id=f"w{i}")
    answer = check(client, "s", 1, task_id="w6", expect=pb.DECISION_DENY)
    assert answer.reason == pb.REASON_TENANT_WINDOW_EXHAUSTED
    assert answer.binding_scope == "tenant.minute"
    assert answer.retry_after.ToMilliseconds() == 15_000  # when the minute window rolls over
    clock.advance(15)
    check(client, "s", 1, task_id="w6")  # a new minute window


def test_step_cap(client: BudgetClient) -> None:
    answer = check(client, tokens=601, expect=pb.DECISION_DENY)
    assert (answer.reason, answer.binding_scope) == (pb.REASON_STEP_CAP_EXCEEDED, "step")
    assert scopes(answer)["task"].reserved_tokens == 0


def test_unknown_tenant_rejected_by_policy(client: BudgetClient) -> None:
    answer = check(client, tenant_id="stranger", expect=pb.DECISION_DENY)
    assert answer.reason == pb.REASON_UNKNOWN_TENANT


def test_same_step_again_is_the_same_reservation(client: BudgetClient) -> None:
    first = check(client, tokens=300)
    again = check(client, tokens=300)  # the same request (another one is refused: test_replay.py)
    assert again.replayed
    assert not first.replayed
    assert (again.reservation_id, again.granted_tokens) == (first.reservation_id, 300)
    assert again.lease_expires_at == first.lease_expires_at
    assert scopes(again)["task"].reserved_tokens == 300


def test_explicit_ceiling_only_on_first_check(client: BudgetClient) -> None:
    check(client, "s1", 100, task_ceiling_tokens=250)
    answer = check(client, "s2", 200, task_ceiling_tokens=900, expect=pb.DECISION_DENY)
    assert scopes(answer)["task"].limit_tokens == 250
    capped = check(client, "s1", 1, task_id="t2", task_ceiling_tokens=10**9)
    assert scopes(capped)["task"].limit_tokens == 1000  # never above the policy


def test_report_replaces_the_reservation(client: BudgetClient) -> None:
    answer = check(client, tokens=500)
    reply = client.report([usage(input_tokens=200, output_tokens=100, idempotency_key="r1")])
    (result,) = reply.results
    assert result.status == pb.REPORT_STATUS_APPLIED
    assert result.reservation_id == answer.reservation_id
    assert (result.charged_tokens, result.refunded_tokens, result.overage_tokens) == (300, 200, 0)
    assert result.task_remaining_tokens == 700
    dup = client.report([usage(input_tokens=200, output_tokens=100, idempotency_key="r1")]).results[0]
    assert dup.status == pb.REPORT_STATUS_DUPLICATE
    budget = client.get_budget(tenant_id="acme", task_id="t1")
    assert scopes(budget)["task"].used_tokens == 300
    assert scopes(budget)["tenant.day"].used_tokens == 300


def test_report_by_reservation_id_and_overage(client: BudgetClient) -> None:
    answer = check(client, tokens=100)
    record = pb.UsageRecord(tenant_id="acme", reservation_id=answer.reservation_id, input_tokens=150, output_tokens=20)
    (result,) = client.report([record]).results
    assert (result.status, result.overage_tokens, result.refunded_tokens) == (pb.REPORT_STATUS_APPLIED, 70, 0)


def test_report_batch_statuses_in_order(client: BudgetClient) -> None:
    check(client, "s1", 100)
    reply = client.report(
        [
            usage("s1", 80, idempotency_key="a"),
            usage("s1", 80, idempotency_key="a"),
            usage("never-checked", 40, idempotency_key="b"),
        ]
    )
    statuses = [r.status for r in reply.results]
    assert statuses == [pb.REPORT_STATUS_APPLIED, pb.REPORT_STATUS_DUPLICATE, pb.REPORT_STATUS_UNRESERVED]
    assert scopes(client.get_budget(tenant_id="acme", task_id="t1"))["task"].used_tokens == 120


def test_release(client: BudgetClient) -> None:
    answer = check(client, tokens=400)
    released = client.release(tenant_id="acme", reservation_id=answer.reservation_id)
    assert (released.status, released.released_tokens) == (pb.RELEASE_STATUS_RELEASED, 400)
    again = client.release(tenant_id="acme", task_id="t1", step_id="s1")
    assert again.status == pb.RELEASE_STATUS_ALREADY_RELEASED
    assert client.release(tenant_id="acme", task_id="t1", step_id="nope").status == pb.RELEASE_STATUS_NOT_FOUND
    assert scopes(client.get_budget(tenant_id="acme", task_id="t1"))["task"].reserved_tokens == 0
    assert not check(client, tokens=400).replayed  # a released step may be checked afresh


def test_get_budget(client: BudgetClient) -> None:
    unknown = client.get_budget(tenant_id="acme", task_id="fresh")
    assert not unknown.task_known
    check(client, "s1", 100)
    check(client, "s2", 200)
    known = client.get_budget(tenant_id="acme", task_id="t1")
    assert known.task_known
    assert (known.task_type, known.active_reservations) == ("general", 2)
    assert scopes(known)["task"].remaining_tokens == 700
    tenant_only = client.get_budget(tenant_id="acme")
    assert list(scopes(tenant_only)) == ["tenant.day", "tenant.minute"]
    assert scopes(tenant_only)["tenant.day"].reserved_tokens == 300


# --- bad input: INVALID_ARGUMENT naming the field, and nothing reserved or recorded -------------------------------


@pytest.mark.parametrize(("fields", "message"), BAD_CHECKS)
def test_bad_check_is_invalid_argument(
    refusing_client: BudgetClient, sync_redis: redis.Redis, fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        check(refusing_client, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert sync_redis.dbsize() == 0


@pytest.mark.parametrize(("fields", "message"), BAD_RECORDS)
def test_bad_report_applies_nothing(
    refusing_client: BudgetClient, sync_redis: redis.Redis, fields: dict[str, Any], message: str
) -> None:
    check(refusing_client, "s1", 100)
    before = sync_redis.hgetall(next(iter(sync_redis.scan_iter("*:task:*"))))
    with pytest.raises(grpc.RpcError) as caught:
        refusing_client.report(
            [usage("s1", 100), usage("s2", 100, **fields)]
        )  # the good first record is not applied either
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert sync_redis.hgetall(next(iter(sync_redis.scan_iter("*:task:*")))) == before
    assert not list(sync_redis.scan_iter("*:idem:*"))


def test_report_timestamp_in_the_future(client: BudgetClient) -> None:
    record = usage()
    record.timestamp.GetCurrentTime()
    record.timestamp.seconds += 3600
    with pytest.raises(grpc.RpcError) as caught:
        client.report([record])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "records[0].timestamp" in caught.value.details()


def test_report_needs_records_and_at_most_1000(client: BudgetClient) -> None:
    for records, message in (([], "records: must hold at least one"), ([usage()] * 1001, "records: holds 1001")):
        with pytest.raises(grpc.RpcError) as caught:
            client.report(records)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in caught.value.details()


@pytest.mark.parametrize(("fields", "message"), BAD_RELEASES)
def test_bad_release(refusing_client: BudgetClient, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        refusing_client.release(**fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


def test_bad_get_budget(client: BudgetClient) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.get_budget(task_id="t1")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant_id: is required" in caught.value.details()


@pytest.mark.parametrize("method", ["Check", "Report", "Release", "GetBudget"])
def test_malformed_bytes_are_invalid_argument_not_internal(strict: RunningSidecar, method: str) -> None:
    # Field 1 (a string in every request) holding invalid UTF-8, then a truncated field.
    for payload in (b"\x0a\x02\xff\xfe", b"\x0a\x10abc"):
        with grpc.insecure_channel(strict.addr) as channel:
            call = channel.unary_unary(f"/budgetwarden.v1.BudgetService/{method}")
            with pytest.raises(grpc.RpcError) as caught:
                call(payload, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert "request: not a valid" in caught.value.details()


# --- health, reflection -------------------------------------------------------------------------------------------


def test_health_and_reflection(sidecar: RunningSidecar) -> None:
    with grpc.insecure_channel(sidecar.addr) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "budgetwarden.v1.BudgetService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {service.name for service in reply.list_services_response.service}
        assert "budgetwarden.v1.BudgetService" in names
        assert "grpc.health.v1.Health" in names


# --- the fail mode ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("client_class", [BudgetClient, StreamingClient])
@pytest.mark.parametrize(
    ("mode", "decision", "reason", "granted"),
    [("closed", pb.DECISION_DENY, pb.REASON_FAIL_CLOSED, 0), ("open", pb.DECISION_ALLOW, pb.REASON_FAIL_OPEN, 100)],
)
def test_hung_redis_gets_the_fail_mode_within_the_deadline(
    start_sidecar: Callable[..., RunningSidecar],
    black_hole: BlackHole,
    mode: str,
    decision: int,
    reason: int,
    granted: int,
    client_class: type[BudgetClient],
) -> None:
    running = start_sidecar(**black_hole.as_redis, fail_mode=mode, check_deadline_ms=50)
    with client_class(running.addr, timeout=10) as c:
        answer = check(c, expect=decision, fail_mode=True)  # answered (not DEADLINE_EXCEEDED): Redis never replies
    assert (answer.reason, answer.granted_tokens) == (reason, granted)
    assert not answer.scopes


@pytest.mark.parametrize("client_class", [BudgetClient, StreamingClient])
def test_check_honours_a_client_deadline_shorter_than_the_servers(
    start_sidecar: Callable[..., RunningSidecar], black_hole: BlackHole, client_class: type[BudgetClient]
) -> None:
    running = start_sidecar(**black_hole.as_redis, check_deadline_ms=60_000)
    with client_class(running.addr, timeout=5.0) as c:  # the sidecar answers at 90% of it: 0.5 s to spare
        answer = check(c, expect=pb.DECISION_DENY, fail_mode=True)
    assert answer.reason == pb.REASON_FAIL_CLOSED


@pytest.mark.parametrize("client_class", [BudgetClient, StreamingClient])
def test_unreachable_redis(start_sidecar: Callable[..., RunningSidecar], client_class: type[BudgetClient]) -> None:
    running = start_sidecar(redis_url=f"redis://127.0.0.1:{free_port()}/0", fail_mode="open")
    with client_class(running.addr) as c:
        answer = check(c, fail_mode=True)
        assert answer.reason == pb.REASON_FAIL_OPEN
        # The fail-open answer's reservation id carries the task and step it was granted for (nothing was stored).
        grant = parse_fail_open_id(answer.reservation_id)
        assert grant is not None
        assert (grant.task_id, grant.step_id) == ("t1", "s1")
        for call in (
            lambda: c.report([usage()]),
            lambda: c.get_budget(tenant_id="acme"),
            lambda: c.release(tenant_id="acme", task_id="t", step_id="s"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_fail_open_usage_is_reconciled_when_reported(
    start_sidecar: Callable[..., RunningSidecar], redis_url: str, black_hole: BlackHole
) -> None:
    down = start_sidecar(**black_hole.as_redis, fail_mode="open", check_deadline_ms=50)
    with BudgetClient(down.addr, timeout=TEST_RPC_TIMEOUT_S) as c:
        admitted = check(c, tokens=100, fail_mode=True)
    up = start_sidecar(redis_url=redis_url)
    with BudgetClient(up.addr, timeout=TEST_RPC_TIMEOUT_S) as c:
        (result,) = c.report([usage(reservation_id=admitted.reservation_id, input_tokens=90)]).results
        assert result.status == pb.REPORT_STATUS_UNRESERVED
        assert scopes(c.get_budget(tenant_id="acme", task_id="t1"))["task"].used_tokens == 90


def test_health_on_its_own_listener(start_sidecar: Callable[..., RunningSidecar]) -> None:
    health_addr = f"127.0.0.1:{free_port()}"
    running = start_sidecar(health_listen=health_addr)
    with grpc.insecure_channel(health_addr) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:  # only health there: the budget API stays on its own listener
            channel.unary_unary("/budgetwarden.v1.BudgetService/Check")(b"", timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        check(client)


def test_a_sidecar_bound_to_a_tenant_serves_only_that_tenant(start_sidecar: Callable[..., RunningSidecar]) -> None:
    running = start_sidecar(tenant="acme")
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        answer = client.check(task_id="t1", step_id="s1", estimated_input_tokens=10)  # no tenant: the bound one
        assert answer.decision == pb.DECISION_ALLOW
        assert client.get_budget(task_id="t1").task_known
        assert client.get_budget(tenant_id="acme", task_id="t1").task_known
        for call in (
            lambda: client.check(tenant_id="globex", task_id="t1", step_id="s2", estimated_input_tokens=10),
            lambda: client.get_budget(tenant_id="globex"),
            lambda: client.release(tenant_id="globex", task_id="t1", step_id="s1"),
            lambda: client.report([usage(), pb.UsageRecord(tenant_id="globex", task_id="t", step_id="s")]),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "serves tenant 'acme' only" in caught.value.details()
        (result,) = client.report([pb.UsageRecord(task_id="t1", step_id="s1", input_tokens=8)]).results
        assert result.status == pb.REPORT_STATUS_APPLIED
    messages = [
        pb.ReportStreamRequest(records=[pb.UsageRecord(task_id="t1", step_id="s9", input_tokens=1)]),
        pb.ReportStreamRequest(records=[pb.UsageRecord(tenant_id="globex", task_id="t", step_id="s")]),
    ]
    with grpc.insecure_channel(running.addr) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.BudgetServiceStub(channel).ReportStream(iter(messages), timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "message 1: records[0].tenant_id: this sidecar serves tenant 'acme' only"


def test_the_sidecars_default_task_type(start_sidecar: Callable[..., RunningSidecar], tmp_path: Any) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(STRICT_POLICY + "  tiny:\n    per_task: {tokens: 50}\n")
    running = start_sidecar(policy_file=policy, default_task_type="tiny")
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        answer = check(client, "s1", 100, expect=pb.DECISION_DENY)
        assert answer.reason == pb.REASON_TASK_BUDGET_EXHAUSTED  # tiny, not the policy's general
        check(client, "s2", 100, task_id="t2", task_type="general")
