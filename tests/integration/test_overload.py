"""Overload (issue 16): a sidecar offered more checks than its store answers sheds the excess at once with
RESOURCE_EXHAUSTED instead of queueing it, and one tenant cannot take every slot. The store here never answers (a
socket that accepts and stays silent), so admitted checks stay in flight as long as the test needs."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from budgetwarden_client import Budget, BudgetClient, BudgetUnavailable

from support import BlackHole, RunningSidecar

RPC_TIMEOUT_S = 120.0
WAIT_S = 60.0


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(8) as executor:
        yield executor


def stalled_sidecar(start: Callable[..., RunningSidecar], hole: BlackHole, **settings: object) -> RunningSidecar:
    """Checks wait for the silent store for a minute: in flight until the sidecar stops (with no grace)."""
    return start(**hole.as_redis, check_deadline_ms=60_000, shutdown_grace_seconds=0, **settings)


def in_flight(running: RunningSidecar) -> int:
    assert running.sidecar is not None
    assert running.sidecar.servicer is not None
    return running.sidecar.servicer.admission.in_flight


def wait_in_flight(running: RunningSidecar, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while in_flight(running) < count:
        assert time.monotonic() < deadline, f"{count} checks never got in flight (have {in_flight(running)})"
        time.sleep(0.01)


def check_code(client: BudgetClient, tenant: str, step: str) -> grpc.StatusCode:
    try:
        client.check(tenant_id=tenant, task_id="t", step_id=step, estimated_input_tokens=10)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined, no-any-return]
    return grpc.StatusCode.OK


def test_checks_beyond_the_bound_are_shed_at_once_while_the_admitted_ones_wait(
    start_sidecar: Callable[..., RunningSidecar], black_hole: BlackHole, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    running = stalled_sidecar(start_sidecar, black_hole, max_checks_in_flight=2, tenant_in_flight_share=1.0)
    with BudgetClient(running.addr, timeout=RPC_TIMEOUT_S) as client:
        waiting = [pool.submit(check_code, client, "acme", f"s{n}") for n in range(2)]
        wait_in_flight(running, 2)
        with pytest.raises(grpc.RpcError) as shed:
            client.check(tenant_id="acme", task_id="t", step_id="s3", estimated_input_tokens=10)
        assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "overloaded: this sidecar is at its bound of 2 checks in flight" in shed.value.details()
        assert not any(call.done() for call in waiting)  # the admitted ones are still waiting for the store
        assert in_flight(running) == 2  # the shed check took no slot
        running.stop()
        assert {call.result() for call in waiting} <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


def test_a_noisy_tenant_cannot_take_every_slot(
    start_sidecar: Callable[..., RunningSidecar], black_hole: BlackHole, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    running = stalled_sidecar(start_sidecar, black_hole, max_checks_in_flight=4, tenant_in_flight_share=0.5)
    with BudgetClient(running.addr, timeout=RPC_TIMEOUT_S) as client:
        noisy = [pool.submit(check_code, client, "noisy", f"s{n}") for n in range(2)]
        wait_in_flight(running, 2)
        assert check_code(client, "noisy", "s3") == grpc.StatusCode.RESOURCE_EXHAUSTED  # over its share
        quiet = pool.submit(check_code, client, "quiet", "s1")
        wait_in_flight(running, 3)  # the other tenant still got in
        assert not quiet.done()
        running.stop()
        assert all(call.result() != grpc.StatusCode.RESOURCE_EXHAUSTED for call in [*noisy, quiet])


def test_a_check_stream_message_sheds_the_checks_beyond_the_bound_one_by_one(
    start_sidecar: Callable[..., RunningSidecar], black_hole: BlackHole
) -> None:
    # A short check deadline: the admitted checks get the fail mode's answer, the shed one its own refusal.
    running = start_sidecar(
        **black_hole.as_redis, check_deadline_ms=50, max_checks_in_flight=2, tenant_in_flight_share=1.0
    )
    checks = [dict(tenant_id="acme", task_id="t", step_id=f"s{n}", estimated_input_tokens=10) for n in range(3)]
    with BudgetClient(running.addr, timeout=RPC_TIMEOUT_S) as client:
        answers = client.check_many(checks)
    assert [getattr(answer, "from_fail_mode", None) for answer in answers[:2]] == [True, True]
    assert isinstance(answers[2], grpc.RpcError)
    assert answers[2].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert in_flight(running) == 0


def test_the_step_api_takes_a_shed_check_to_its_local_fail_mode(
    start_sidecar: Callable[..., RunningSidecar], black_hole: BlackHole, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    running = stalled_sidecar(start_sidecar, black_hole, max_checks_in_flight=1)
    with BudgetClient(running.addr, timeout=RPC_TIMEOUT_S) as client:
        waiting = pool.submit(check_code, client, "acme", "s0")
        wait_in_flight(running, 1)
        open_budget = Budget(running.addr, tenant_id="acme", timeout=RPC_TIMEOUT_S, fail_mode="open")
        with open_budget, open_budget.step("t", "s1", model="small", estimated_input_tokens=10) as step:
            assert step.from_fail_mode  # allowed, marked: the sidecar could not decide in time
        closed_budget = Budget(running.addr, tenant_id="acme", timeout=RPC_TIMEOUT_S)  # closed: the default
        with closed_budget, pytest.raises(BudgetUnavailable), closed_budget.step("t", "s2", estimated_input_tokens=10):
            pytest.fail("must not run")
        running.stop()
        assert waiting.result() != grpc.StatusCode.OK
