"""Every store call has a deadline: with a Redis that never answers (a black hole, or a Valkey stopped with SIGSTOP)
each RPC answers UNAVAILABLE (a check: its fail mode) instead of hanging until the caller gives up."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from budgetwarden.store import checkpoint_id
from budgetwarden.store._embedded import EmbeddedRedis
from budgetwarden.transport._answering import MARGIN_SHARE, time_for_store
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_api.v1 import budget_pb2_grpc as pb_grpc
from budgetwarden_client import AdminClient, BudgetClient

from support import BlackHole, RunningSidecar, free_port

# Far beyond any store deadline: a call that comes back before it was answered by the sidecar, not given up on.
CLIENT_TIMEOUT_S = 30.0


def _store_calls(client: BudgetClient) -> dict[str, Callable[[], Any]]:
    record = pb.UsageRecord(tenant_id="acme", task_id="t1", step_id="s1", input_tokens=10, output_tokens=5)
    stub = pb_grpc.BudgetServiceStub(client._channel)
    return {
        "Report": lambda: client.report([record]),
        "ReportStream": lambda: stub.ReportStream(
            iter([pb.ReportStreamRequest(records=[record])]), timeout=client.timeout
        ),
        "Release": lambda: client.release(tenant_id="acme", task_id="t1", step_id="s1"),
        "GetBudget": lambda: client.get_budget(tenant_id="acme", task_id="t1"),
    }


def _admin_calls(admin: AdminClient) -> dict[str, Callable[[], Any]]:
    checkpoint = checkpoint_id("acme", "t1", 1)
    return {
        "ApproveCheckpoint": lambda: admin.approve(checkpoint, add_tokens=10),
        "DenyCheckpoint": lambda: admin.deny(checkpoint),
        "SetTaskCeiling": lambda: admin.set_ceiling(tenant_id="acme", task_id="t1", mode=1, ceiling_tokens=10),
        "ResetTask": lambda: admin.reset_task("acme", "t1"),
        "GetTenantWindows": lambda: admin.tenant_windows("acme"),
    }


def _assert_every_call_unavailable(running: RunningSidecar, timeout: float = CLIENT_TIMEOUT_S) -> None:
    """Each call at once (they wait out the store deadline side by side), and each must answer UNAVAILABLE."""
    assert running.settings.admin_listen
    with (
        BudgetClient(running.addr, timeout=timeout) as client,
        AdminClient(running.settings.admin_listen, timeout=timeout) as admin,
    ):
        calls = {**_store_calls(client), **_admin_calls(admin)}
        with ThreadPoolExecutor(len(calls) + 1) as pool:
            checked = pool.submit(client.check, tenant_id="acme", task_id="t1", step_id="s2", estimated_input_tokens=10)
            failed = {name: pool.submit(_rpc_error, call) for name, call in calls.items()}
            answer = checked.result()
            codes = {name: future.result() for name, future in failed.items()}
    assert (answer.from_fail_mode, answer.reason) == (True, pb.REASON_FAIL_CLOSED)
    # UNAVAILABLE, not DEADLINE_EXCEEDED: the sidecar answered, before the client would have given up.
    assert {name: code for name, (code, _) in codes.items()} == dict.fromkeys(codes, grpc.StatusCode.UNAVAILABLE)
    for details in (details for _, details in codes.values()):
        assert details.startswith("budget store unavailable"), details


def _rpc_error(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def test_a_black_hole_redis_gets_unavailable_from_every_call(
    start_sidecar: Callable[..., RunningSidecar], black_hole: BlackHole
) -> None:
    running = start_sidecar(
        **black_hole.as_redis,
        admin_listen=f"127.0.0.1:{free_port()}",
        store_deadline_ms=300,
        check_deadline_ms=1000,  # the check's fail-mode answer is expected here: no need to wait the tests' 30 s
    )
    _assert_every_call_unavailable(running)


def test_the_callers_deadline_wins_over_a_longer_store_deadline(
    start_sidecar: Callable[..., RunningSidecar], black_hole: BlackHole
) -> None:
    """A store deadline longer than the caller's: the call still answers UNAVAILABLE before the caller gives up."""
    running = start_sidecar(
        **black_hole.as_redis,
        admin_listen=f"127.0.0.1:{free_port()}",
        check_deadline_ms=60_000,
        store_deadline_ms=60_000,
        deadline_margin_ms=1000,  # generous: the answer has a second to reach the client on a busy machine
    )
    _assert_every_call_unavailable(running, timeout=5.0)


@pytest.fixture
def own_valkey(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Valkey of this test's own, so stopping it disturbs no other test."""
    server = EmbeddedRedis(tmp_path / "valkey", port=free_port(), persistent=False)
    server.start()
    yield server
    server.stop()


def test_a_stopped_valkey_gets_unavailable_and_is_used_again_once_it_resumes(
    start_sidecar: Callable[..., RunningSidecar], own_valkey: EmbeddedRedis
) -> None:
    # Deadlines of a second: short enough to wait out while Valkey is stopped, and a busy machine answers within
    # them while it runs (the checks before and after the stop must come from the store, not the fail mode).
    running = start_sidecar(
        redis_url=own_valkey.url,
        admin_listen=f"127.0.0.1:{free_port()}",
        store_deadline_ms=1000,
        check_deadline_ms=1000,
    )
    with BudgetClient(running.addr, timeout=CLIENT_TIMEOUT_S) as client:
        # Connections are open and pooled before Valkey stops: the stall is on a live connection.
        answer = _eventually(
            lambda: client.check(tenant_id="acme", task_id="t1", step_id="s1", estimated_input_tokens=10)
        )
        assert answer.decision == pb.DECISION_ALLOW
        assert _eventually(lambda: client.get_budget(tenant_id="acme", task_id="t1")).task_known
    pid = own_valkey.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        _assert_every_call_unavailable(running)
    finally:
        os.kill(pid, signal.SIGCONT)
    with BudgetClient(running.addr, timeout=CLIENT_TIMEOUT_S) as client:
        # No connection stalled for good: once Valkey runs again (the calls that waited for it are still being
        # answered for a moment), so does every call, within a generous bound.
        assert _eventually(lambda: client.get_budget(tenant_id="acme", task_id="t1")).task_known
        answer = _eventually(
            lambda: client.check(tenant_id="acme", task_id="t1", step_id="s3", estimated_input_tokens=10)
        )
        assert answer.decision == pb.DECISION_ALLOW


def _eventually(call: Callable[[], Any], bound_s: float = CLIENT_TIMEOUT_S) -> Any:
    """The first answer of ``call`` that the store gave (not UNAVAILABLE, not the fail mode), until ``bound_s``."""
    deadline = time.monotonic() + bound_s
    while True:
        try:
            answer = call()
            if not getattr(answer, "from_fail_mode", False):
                return answer
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        assert time.monotonic() < deadline, f"the store did not answer again within {bound_s} s"
        time.sleep(0.05)


# --- the margin kept back from a caller's deadline ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("remaining_s", "margin_s", "expected_s"),
    [
        (None, 0.02, None),  # no caller deadline: the limiter's own deadlines apply
        (0.05, 0.02, 0.03),  # short deadlines keep the fixed margin
        (0.1, 0.02, 0.08),
        (10.0, 0.02, 9.0),  # long ones keep their share, which is more
        (0.03, 0.02, 0.015),  # the margin is at most half: with Redis healthy, the store still gets to decide
        (0.0, 0.02, 0.0),
        (-0.01, 0.02, 0.0),  # a deadline already past: the fail mode answers at once
        (0.05, 0.0, 0.045),  # a margin of 0: the share alone (the rule before the fixed margin)
    ],
)
def test_the_margin_kept_back_from_a_callers_deadline(
    remaining_s: float | None, margin_s: float, expected_s: float | None
) -> None:
    assert MARGIN_SHARE == 0.1
    given = time_for_store(remaining_s, margin_s)
    if expected_s is None:
        assert given is None
    else:
        assert given == pytest.approx(expected_s)
