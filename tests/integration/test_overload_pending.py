"""Overload (issue 16), the queue in front of the handlers: offered more checks than its CPU serves, the sidecar's
backlog forms in gRPC (calls received, not yet taken by a handler), where max_checks_in_flight does not see it.
--max-pending-calls bounds it: here the sidecar's event loop is held, so every call waits in gRPC, and the calls
beyond the bound are refused at once (CANCELLED) while the ones within it are answered once the loop runs again."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import Budget

from support import RunningSidecar

CHECK = "/budgetwarden.v1.BudgetService/Check"
RPC_TIMEOUT_S = 120.0
WAIT_S = 60.0


@contextmanager
def held_loop(running: RunningSidecar) -> Iterator[None]:
    """The sidecar's event loop blocked (for at most WAIT_S): no handler takes a call meanwhile."""
    release = threading.Event()
    holding = threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(WAIT_S)

    running._loop.call_soon_threadsafe(hold)
    assert holding.wait(WAIT_S), "the sidecar's loop never ran the hold"
    try:
        yield
    finally:
        release.set()


def test_calls_beyond_the_pending_bound_are_refused_at_once(start_sidecar: Callable[..., RunningSidecar]) -> None:
    running = start_sidecar(max_pending_calls=2)  # refused with rising probability from 2 waiting, all from 4
    with grpc.insecure_channel(running.addr) as channel:
        call = channel.unary_unary(CHECK, pb.CheckRequest.SerializeToString, pb.CheckResponse.FromString)
        with held_loop(running):
            calls = [
                call.future(
                    pb.CheckRequest(tenant_id="acme", task_id="t", step_id=f"s{n}", estimated_input_tokens=10),
                    timeout=RPC_TIMEOUT_S,
                )
                for n in range(12)
            ]
            deadline = time.monotonic() + WAIT_S
            while sum(c.done() for c in calls) < 12 - 4 - 1:  # at most 4 wait in gRPC, 1 more taken by the server
                assert time.monotonic() < deadline, f"only {sum(c.done() for c in calls)} calls were refused"
                time.sleep(0.01)
            refused = [c for c in calls if c.done()]
            assert all(c.code() == grpc.StatusCode.CANCELLED for c in refused)
        answered = [c for c in calls if c not in refused]
        assert all(c.result(RPC_TIMEOUT_S).decision == pb.DECISION_ALLOW for c in answered)


def test_the_step_api_takes_a_call_refused_by_the_pending_bound_to_its_local_fail_mode(
    start_sidecar: Callable[..., RunningSidecar],
) -> None:
    running = start_sidecar(max_pending_calls=2)
    with grpc.insecure_channel(running.addr) as channel:
        call = channel.unary_unary(CHECK, pb.CheckRequest.SerializeToString, pb.CheckResponse.FromString)
        with held_loop(running):
            # Fill gRPC's queue past its hard bound (4): every call after is refused at once.
            waiting = [
                call.future(pb.CheckRequest(tenant_id="acme", task_id="t", step_id=f"s{n}"), timeout=RPC_TIMEOUT_S)
                for n in range(12)
            ]
            deadline = time.monotonic() + WAIT_S
            while sum(c.done() for c in waiting) < 12 - 4 - 1:
                assert time.monotonic() < deadline, "the pending bound never refused a call"
                time.sleep(0.01)
            budget = Budget(running.addr, tenant_id="acme", timeout=RPC_TIMEOUT_S, fail_mode="open")
            with budget, budget.step("t", "refused", model="small", estimated_input_tokens=10) as step:
                assert step.from_fail_mode  # allowed by the client's fail mode: the sidecar refused to queue it
        for c in waiting:
            c.exception(RPC_TIMEOUT_S)  # every call ends once the loop runs again
