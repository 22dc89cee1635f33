"""Issue 11, items 10, 11 and 15: the sidecar watches its store.

A killed embedded server is started again from its append-only file and loses no acknowledged report; readiness
(health ``""`` and the budget service) follows the store while liveness stays up; a URL that is not Redis and a data
dir another budgetwarden holds are one line at start.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from budgetwarden.store._embedded import EmbeddedError, EmbeddedRedis
from budgetwarden_client import BudgetClient, pb

from support import (
    FAST_WATCH,
    TEST_RPC_TIMEOUT_S,
    BlackHole,
    RunningSidecar,
    cli,
    embedded_of,
    free_port,
    one_error_line,
)

pytestmark = pytest.mark.slow

SERVICE = "budgetwarden.v1.BudgetService"
LIVENESS = "liveness"  # the health name the kubelet's liveness and startup probes ask for
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WAIT_S = 60.0
# Pings and process checks this often in these tests, so they wait for conditions, not for the default second.


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting until {what}"
        time.sleep(0.02)


def health(addr: str, service: str = "") -> int:
    with grpc.insecure_channel(addr) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    status: int = answer.status
    return status


class HealthWatch:
    """Every status grpc.health.v1 Watch streams for one service name, collected on a thread."""

    def __init__(self, addr: str, service: str) -> None:
        self.statuses: list[int] = []
        self._channel = grpc.insecure_channel(addr)
        self._call = health_pb2_grpc.HealthStub(self._channel).Watch(health_pb2.HealthCheckRequest(service=service))
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        try:
            for answer in self._call:
                self.statuses.append(answer.status)
        except grpc.RpcError:
            pass  # cancelled by close()

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(10)
        self._channel.close()


def report(client: BudgetClient, task: str, step: str, tokens: int) -> int:
    answer = client.report([pb.UsageRecord(tenant_id="acme", task_id=task, step_id=step, input_tokens=tokens)])
    (result,) = answer.results
    return int(result.status)


# --- item 10: a killed embedded server comes back ---------------------------------------------------------------


def test_a_killed_embedded_server_is_restarted_and_keeps_every_acknowledged_report(
    embedded_sidecar: Callable[..., RunningSidecar],
) -> None:
    sidecar = embedded_sidecar()
    embedded = embedded_of(sidecar)
    first_pid = embedded.pid
    assert first_pid is not None
    readiness = HealthWatch(sidecar.addr, "")
    liveness = HealthWatch(sidecar.addr, LIVENESS)
    with BudgetClient(sidecar.addr, timeout=30) as client:
        acknowledged = 0
        for n in range(20):
            check = client.check(tenant_id="acme", task_id="t", step_id=f"s{n}", estimated_input_tokens=100)
            assert check.decision == pb.DECISION_ALLOW, check
            assert not check.from_fail_mode, check
            assert report(client, "t", f"s{n}", 90 + n) == pb.REPORT_STATUS_APPLIED
            acknowledged += 90 + n

        os.kill(first_pid, signal.SIGKILL)

        def allowed_again() -> bool:
            answer = client.check(tenant_id="acme", task_id="after", step_id="s", estimated_input_tokens=1)
            return answer.decision == pb.DECISION_ALLOW and not answer.from_fail_mode

        wait_for(allowed_again, "checks are decided by the store again")
        assert embedded.pid != first_pid
        # Nothing acknowledged before the kill is lost: counted once, and a replay of each report is a duplicate.
        (task,) = [scope for scope in client.get_budget(tenant_id="acme", task_id="t").scopes if scope.name == "task"]
        assert task.used_tokens == acknowledged
        for n in range(20):
            assert report(client, "t", f"s{n}", 90 + n) == pb.REPORT_STATUS_DUPLICATE
    wait_for(lambda: readiness.statuses[-1:] == [SERVING], "readiness is SERVING again")
    readiness.close()
    liveness.close()
    # While the child was down the sidecar said so, then it was ready again; liveness never wavered.
    assert readiness.statuses[0] == SERVING
    assert NOT_SERVING in readiness.statuses, readiness.statuses
    assert readiness.statuses.index(NOT_SERVING) < len(readiness.statuses) - 1
    assert liveness.statuses == [SERVING]


def test_a_restart_that_fails_is_tried_again_with_backoff(
    embedded_sidecar: Callable[..., RunningSidecar], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While the server cannot be started again (here: its binary is gone), restarts are retried with growing waits
    and readiness says NOT_SERVING; once it can, it comes back on the same socket and data dir."""
    caplog.set_level(logging.INFO, logger="budgetwarden.server")
    sidecar = embedded_sidecar()
    embedded = embedded_of(sidecar)
    binary, url, first_pid = embedded.binary, embedded.url, embedded.pid
    assert first_pid is not None
    with BudgetClient(sidecar.addr, timeout=30) as client:
        assert report(client, "t", "before", 7) == pb.REPORT_STATUS_UNRESERVED  # no check came before it
        embedded.binary = tmp_path / "no-such-server"
        os.kill(first_pid, signal.SIGKILL)

        def failed_restarts() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.getMessage() == "embedded server restart failed"]

        wait_for(lambda: len(failed_restarts()) >= 3, "three restarts failed")
        assert health(sidecar.addr, "") == NOT_SERVING
        assert health(sidecar.addr, SERVICE) == NOT_SERVING
        assert health(sidecar.addr, LIVENESS) == SERVING
        waits = [r.__dict__["retry_in_s"] for r in failed_restarts()[:3]]
        assert waits == sorted(waits), waits
        assert waits[0] < waits[2], waits

        embedded.binary = binary
        wait_for(lambda: health(sidecar.addr, "") == SERVING, "readiness is SERVING again")
        assert embedded.url == url
        assert embedded.pid != first_pid
        assert report(client, "t", "before", 7) == pb.REPORT_STATUS_DUPLICATE


# --- item 11: readiness follows the store, liveness stays up ----------------------------------------------------


def test_readiness_is_not_serving_while_the_store_cannot_be_reached_and_liveness_stays_up(
    start_sidecar: Callable[..., RunningSidecar], black_hole: BlackHole, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens here yet
    sidecar = start_sidecar(redis_url=f"redis://127.0.0.1:{port}/0", **FAST_WATCH)
    assert health(sidecar.addr, "") == NOT_SERVING
    assert health(sidecar.addr, SERVICE) == NOT_SERVING
    assert health(sidecar.addr, LIVENESS) == SERVING

    with EmbeddedRedis(tmp_path / "late", port=port, persistent=False):
        wait_for(lambda: health(sidecar.addr, "") == SERVING, "readiness is SERVING once Redis answers")
        assert health(sidecar.addr, SERVICE) == SERVING
    wait_for(lambda: health(sidecar.addr, "") == NOT_SERVING, "readiness is NOT_SERVING once Redis is gone")
    assert health(sidecar.addr, LIVENESS) == SERVING

    # A Redis that accepts and never answers (stalled) is not ready either: the ping has a timeout.
    stalled = start_sidecar(redis_url=f"redis://127.0.0.1:{black_hole.port}/0", **FAST_WATCH)
    assert health(stalled.addr, "") == NOT_SERVING
    assert health(stalled.addr, LIVENESS) == SERVING


def test_a_stopped_embedded_server_makes_the_sidecar_not_ready_until_it_runs_again(
    embedded_sidecar: Callable[..., RunningSidecar],
) -> None:
    sidecar = embedded_sidecar()
    pid = embedded_of(sidecar).pid
    assert pid is not None
    assert health(sidecar.addr, "") == SERVING
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: health(sidecar.addr, "") == NOT_SERVING, "readiness is NOT_SERVING")
        assert health(sidecar.addr, LIVENESS) == SERVING
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: health(sidecar.addr, "") == SERVING, "readiness is SERVING again")
    assert embedded_of(sidecar).pid == pid  # a stalled child is not restarted


# --- item 11 and 15: one line at start ----------------------------------------------------------------------------


def test_a_second_serve_on_the_same_data_dir_is_one_line(
    embedded_sidecar: Callable[..., RunningSidecar], tmp_path: Path
) -> None:
    """A second `make run` in the same folder: same data dir, same port."""
    first = embedded_sidecar()
    result = cli("serve", "--data-dir", str(tmp_path / "data"), "--listen", first.addr)
    line = one_error_line(result)
    assert result.returncode == 1
    assert line == (
        f"budgetwarden serve: error: data dir {(tmp_path / 'data').resolve()} is in use by another budgetwarden "
        f"(pid {os.getpid()}); stop it or give this one another --data-dir"
    )
    # the first one still serves, from its own server
    with BudgetClient(first.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        answer = client.check(tenant_id="acme", task_id="t", step_id="s", estimated_input_tokens=1)
        assert answer.decision == pb.DECISION_ALLOW
        assert not answer.from_fail_mode
    assert health(first.addr, "") == SERVING


def test_a_data_dir_is_free_again_once_its_server_stops(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path, port=free_port(), persistent=False)
    first.start()
    second = EmbeddedRedis(tmp_path, port=free_port(), persistent=False)
    try:
        with pytest.raises(EmbeddedError, match=f"pid {os.getpid()}"):
            second.start()
    finally:
        first.stop()
    with second:
        assert second.exit_code is None
