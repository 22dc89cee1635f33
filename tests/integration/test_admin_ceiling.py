"""SetTaskCeiling and ApproveCheckpoint over gRPC against the real Valkey: the highest ceiling holds, with a code no
retry can change and nothing written; ADD needs a ceiling to add to; a request id (the caller's or the sidecar's own)
applies a change once, also when the Redis client resends the script after a dropped connection."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from budgetwarden.domain._model import MAX_LIMIT_TOKENS, MAX_LIMIT_USD
from budgetwarden_api.v1 import admin_pb2 as admin_pb
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import AdminClient, BudgetClient

from support import RunningSidecar, free_port

POLICY = """
unknown_tenants: reject
tenants:
  acme:
    windows:
      day: {tokens: 1000000000, usd: 1000}
models:
  big: {input_usd_per_mtok: 10, output_usd_per_mtok: 30, degrade_to: small}
  small: {input_usd_per_mtok: 1, output_usd_per_mtok: 4}
default_task_type: agent
task_types:
  agent:
    per_task: {tokens: 10000, usd: 10}
    per_step: {tokens: 4000}
    soft_threshold: 0.5
    checkpoint_threshold: 0.8
    degrade:
      - {name: cheaper, model: cheaper}
  gate:
    per_task: {tokens: 100, usd: 0.0001}
    checkpoint_threshold: 1.0
"""
SET, ADD = admin_pb.CEILING_MODE_SET, admin_pb.CEILING_MODE_ADD
# The request field of each ceiling, in SetTaskCeiling and in ApproveCheckpoint, and the highest value it may reach.
CEILINGS = [
    pytest.param("ceiling_tokens", "add_tokens", "limit_tokens", MAX_LIMIT_TOKENS, id="tokens"),
    pytest.param("ceiling_usd_micros", "add_usd_micros", "limit_usd_micros", MAX_LIMIT_USD, id="usd"),
]


def start(start_sidecar: Callable[..., RunningSidecar], tmp_path: Path, **settings: Any) -> RunningSidecar:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    values: dict[str, Any] = {"admin_listen": f"127.0.0.1:{free_port()}", "check_deadline_ms": 10_000}
    return start_sidecar(policy_file=policy, **(values | settings))


@pytest.fixture
def running(start_sidecar: Callable[..., RunningSidecar], tmp_path: Path) -> RunningSidecar:
    return start(start_sidecar, tmp_path)


@pytest.fixture
def client(running: RunningSidecar) -> Iterator[BudgetClient]:
    with BudgetClient(running.addr, timeout=30) as c:
        yield c


@pytest.fixture
def admin(running: RunningSidecar) -> Iterator[AdminClient]:
    assert running.settings.admin_listen
    with AdminClient(running.settings.admin_listen, timeout=30) as c:
        yield c


def check(client: BudgetClient, task: str, step: str, tokens: int, **fields: Any) -> pb.CheckResponse:
    values: dict[str, Any] = {"tenant_id": "acme", "task_id": task, "step_id": step, "model": "small"}
    return client.check(**(values | {"estimated_input_tokens": tokens} | fields))


def task_state(client: BudgetClient, task: str) -> pb.GetBudgetResponse:
    return client.get_budget(tenant_id="acme", task_id=task)


def task_scope(response: Any) -> pb.ScopeState:
    return next(scope for scope in response.scopes if scope.name == "task")


def ceiling(admin: AdminClient, task: str, mode: int, **amounts: Any) -> admin_pb.SetTaskCeilingResponse:
    return admin.set_ceiling(tenant_id="acme", task_id=task, mode=mode, **amounts)


def refused(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


# --- the highest ceiling -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "approve_field", "limit", "highest"), CEILINGS)
def test_add_reaches_the_highest_ceiling_and_no_further(
    client: BudgetClient, admin: AdminClient, field: str, approve_field: str, limit: str, highest: int
) -> None:
    assert check(client, "t", "s1", 10).decision == pb.DECISION_ALLOW  # the first check fixes the ceilings
    assert getattr(ceiling(admin, "t", SET, **{field: highest - 5}).task, limit) == highest - 5
    assert getattr(ceiling(admin, "t", ADD, **{field: 5}).task, limit) == highest  # exactly the highest: fine
    for amount in (1, highest):  # one more, or as much again (9,222 of these once reached 9.2e18, then UNAVAILABLE)
        error = refused(lambda amount=amount: ceiling(admin, "t", ADD, **{field: amount}))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION  # not retryable: the same call fails again
        assert error.details().startswith(f"{field}: ")
        assert f"would pass the highest allowed ({highest})" in error.details()
        assert "nothing was changed" in error.details()
    assert getattr(task_scope(task_state(client, "t")), limit) == highest


def test_a_refused_add_changes_neither_ceiling(client: BudgetClient, admin: AdminClient) -> None:
    check(client, "t", "s1", 10)
    ceiling(admin, "t", SET, ceiling_tokens=1000, ceiling_usd_micros=MAX_LIMIT_USD)
    error = refused(lambda: ceiling(admin, "t", ADD, ceiling_tokens=500, ceiling_usd_micros=1))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details().startswith("ceiling_usd_micros: ")
    scope = task_scope(task_state(client, "t"))
    assert (scope.limit_tokens, scope.limit_usd_micros) == (1000, MAX_LIMIT_USD)  # the tokens were not added either


@pytest.mark.parametrize(("field", "approve_field", "limit", "highest"), CEILINGS)
def test_an_approval_never_takes_a_ceiling_past_the_highest(
    client: BudgetClient, admin: AdminClient, field: str, approve_field: str, limit: str, highest: int
) -> None:
    stop = check(client, "g", "s1", 150, task_type="gate")  # above the 100-token ceiling of a checkpoint-at-1.0 type
    assert stop.decision == pb.DECISION_CHECKPOINT
    ceiling(admin, "g", SET, **{field: highest - 10})  # the checkpoint stays open until it is decided

    error = refused(lambda: admin.approve(stop.checkpoint_id, **{approve_field: 11}))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details().startswith(f"{approve_field}: ")
    assert f"would pass the highest allowed ({highest})" in error.details()
    state = task_state(client, "g")
    assert state.checkpoint.id == stop.checkpoint_id  # still open: the approval was not applied
    assert getattr(task_scope(state), limit) == highest - 10

    approved = admin.approve(stop.checkpoint_id, **{approve_field: 10})
    assert approved.outcome == admin_pb.CHECKPOINT_OUTCOME_APPROVED
    assert getattr(approved.task, limit) == highest
    again = admin.approve(stop.checkpoint_id, **{approve_field: 10})  # idempotent, also at the highest ceiling
    assert again.outcome == admin_pb.CHECKPOINT_OUTCOME_ALREADY_APPROVED


# --- ADD before the first check ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "approve_field", "limit", "highest"), CEILINGS)
def test_add_before_the_first_check_is_refused_clearly(
    client: BudgetClient, admin: AdminClient, field: str, approve_field: str, limit: str, highest: int
) -> None:
    error = refused(lambda: ceiling(admin, "new", ADD, **{field: 500}))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details().startswith(f"{field}: the task has no ")
    assert "its first check fixes it" in error.details()
    assert "CEILING_MODE_SET" in error.details()
    assert not task_state(client, "new").task_known  # nothing was written

    first = check(client, "new", "s1", 10)
    policy_ceiling = getattr(task_scope(first), limit)
    assert policy_ceiling == {"limit_tokens": 10000, "limit_usd_micros": 10_000_000}[limit]
    assert getattr(ceiling(admin, "new", ADD, **{field: 500}).task, limit) == policy_ceiling + 500


def test_add_after_a_set_before_the_first_check_is_kept_by_it(client: BudgetClient, admin: AdminClient) -> None:
    ceiling(admin, "pre", SET, ceiling_tokens=3000)
    assert ceiling(admin, "pre", ADD, ceiling_tokens=500).task.limit_tokens == 3500
    error = refused(lambda: ceiling(admin, "pre", ADD, ceiling_usd_micros=5))  # no cost ceiling set yet
    assert error.details().startswith("ceiling_usd_micros: the task has no cost (micro-USD) ceiling")
    first = check(client, "pre", "s1", 10)
    assert task_scope(first).limit_tokens == 3500  # the operator's ceiling, not the policy's 10000
    assert task_scope(first).limit_usd_micros == 10_000_000  # the policy's, filled in by the first check


def test_add_to_a_task_known_only_from_a_report_is_refused(client: BudgetClient, admin: AdminClient) -> None:
    record = pb.UsageRecord(tenant_id="acme", task_id="early", step_id="s0", model="small", input_tokens=40)
    assert client.report([record]).results[0].status == pb.REPORT_STATUS_UNRESERVED
    error = refused(lambda: ceiling(admin, "early", ADD, ceiling_tokens=100))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert task_scope(check(client, "early", "s1", 10)).limit_tokens == 10000


# --- idempotency ---------------------------------------------------------------------------------------------------


def test_a_request_id_applies_a_change_once(client: BudgetClient, admin: AdminClient) -> None:
    check(client, "t", "s1", 10)
    first = ceiling(admin, "t", ADD, ceiling_tokens=100, request_id="op-1")
    assert (first.task.limit_tokens, first.replayed) == (10100, False)
    again = ceiling(admin, "t", ADD, ceiling_tokens=100, request_id="op-1")
    assert (again.task.limit_tokens, again.replayed) == (10100, True)

    error = refused(lambda: ceiling(admin, "t", ADD, ceiling_tokens=200, request_id="op-1"))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error.details().startswith("request_id: was used for another change")
    assert task_scope(task_state(client, "t")).limit_tokens == 10100

    other = ceiling(admin, "t", ADD, ceiling_tokens=100, request_id="op-2")
    assert (other.task.limit_tokens, other.replayed) == (10200, False)
    assert ceiling(admin, "t", ADD, ceiling_tokens=100).task.limit_tokens == 10300  # no id: each call adds


def test_bad_request_id(admin: AdminClient) -> None:
    error = refused(lambda: ceiling(admin, "t", SET, ceiling_tokens=1, request_id="a\x7f" * 1000))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("request_id: ")


class DroppingProxy:
    """A TCP proxy in front of Valkey. Once armed with a marker, the next command holding it reaches Valkey and runs;
    then the client's connection is closed before the reply reaches it: a connection dropped mid-call."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.markers: tuple[bytes, ...] = ()
        self.dropped = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, *markers: bytes) -> None:
        self.markers = markers

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.sockets += (client, upstream)
            drop_reply = threading.Event()
            threading.Thread(target=self._requests, args=(client, upstream, drop_reply), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client, drop_reply), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, drop_reply: threading.Event) -> None:
        while data := _recv(client):
            if self.markers and all(marker in data for marker in self.markers):
                self.markers = ()
                drop_reply.set()  # before the command leaves: its reply is the next thing Valkey sends
            upstream.sendall(data)
        _close(client, upstream)

    def _replies(self, upstream: socket.socket, client: socket.socket, drop_reply: threading.Event) -> None:
        while data := _recv(upstream):
            if drop_reply.is_set():  # the command ran: Valkey is answering it
                _close(client, upstream)
                self.dropped.set()
                return
            client.sendall(data)
        _close(client, upstream)

    def close(self) -> None:
        self.listener.close()
        _close(*self.sockets)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def test_the_redis_clients_retry_after_a_dropped_connection_adds_once(
    start_sidecar: Callable[..., RunningSidecar], redis_url: str, tmp_path: Path
) -> None:
    port = urlsplit(redis_url).port
    assert port is not None
    proxy = DroppingProxy(port)
    running = start(start_sidecar, tmp_path, redis_url=f"redis://127.0.0.1:{proxy.port}")
    assert running.settings.admin_listen
    try:
        with (
            BudgetClient(running.addr, timeout=30) as client,
            AdminClient(running.settings.admin_listen, timeout=30) as admin,
        ):
            check(client, "t", "s1", 10)
            ceiling(admin, "t", SET, ceiling_tokens=1000)  # also loads the admin script, so the next call runs it
            proxy.arm(b"ceiling", b"\r\nadd\r\n")
            raised = ceiling(admin, "t", ADD, ceiling_tokens=500)
            assert proxy.dropped.is_set(), "the proxy did not drop the connection"
            assert task_scope(task_state(client, "t")).limit_tokens == 1500  # the script ran twice, added once
            assert raised.task.limit_tokens == 1500
            assert not raised.replayed  # for the caller, the change was made by this call
    finally:
        running.stop()  # before its Redis goes away
        proxy.close()


# --- an explicit ceiling and the reason of a degrade (issue 11, item 8) -----------------------------------------


def test_a_step_past_the_soft_line_of_an_explicit_ceiling_is_soft_threshold(client: BudgetClient) -> None:
    # An explicit 4000-token ceiling: soft line 2000, checkpoint line 3200.
    first = check(client, "x", "s1", 1001, task_ceiling_tokens=4000)
    assert (first.decision, task_scope(first).limit_tokens) == (pb.DECISION_ALLOW, 4000)
    # As asked, 3001 fits the ceiling but passes the soft line; the cheaper model (same tokens) fits under 3200.
    second = check(client, "x", "s2", 2000, model="big")
    assert (second.decision, second.reason) == (pb.DECISION_DEGRADE, pb.REASON_SOFT_THRESHOLD), second.message
    assert (second.binding_scope, second.advice.model, second.granted_tokens) == ("task", "small", 2000)
