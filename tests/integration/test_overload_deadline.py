"""Overload (issue 16), deadline-aware admission: a check that reaches the sidecar with less of its deadline left than
a check takes there now is shed at once with RESOURCE_EXHAUSTED "overloaded:", not worked on for an answer that comes
too late. The store here never answers (a socket that accepts and stays silent), so a check takes the check deadline
(then the fail mode answers): the first one teaches the sidecar that checks take 5 s."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from budgetwarden_client import BudgetClient

from support import BlackHole, RunningSidecar

CHECK_DEADLINE_MS = 5_000  # what a check takes against the silent store
LONG_S = 120.0  # a caller deadline well beyond it
SHORT_S = 2.5  # a caller deadline under it, still seconds for the check to reach the sidecar


def check(addr: str, timeout: float, step: str) -> tuple[grpc.StatusCode, str]:
    """The status code and message of a check (OK and "" when it was answered)."""
    with BudgetClient(addr, timeout=timeout) as client:
        try:
            client.check(tenant_id="acme", task_id="t", step_id=step, estimated_input_tokens=10)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""


def test_a_check_with_less_deadline_left_than_checks_take_is_shed_at_once(
    start_sidecar: Callable[..., RunningSidecar], black_hole: BlackHole
) -> None:
    running = start_sidecar(**black_hole.as_redis, check_deadline_ms=CHECK_DEADLINE_MS)
    assert running.sidecar is not None
    assert running.sidecar.servicer is not None
    admission = running.sidecar.servicer.admission
    assert check(running.addr, LONG_S, "s0")[0] != grpc.StatusCode.RESOURCE_EXHAUSTED
    assert admission.check_seconds >= CHECK_DEADLINE_MS / 1000  # it took the store's silence, then the fail mode

    code, message = check(running.addr, SHORT_S, "s1")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
    assert message.startswith("overloaded: a check takes this sidecar "), message
    assert message.endswith("were left of this one's deadline; nothing was reserved, retry with backoff"), message
    assert admission.in_flight == 0
    # A caller whose deadline leaves room is still admitted.
    assert check(running.addr, LONG_S, "s2")[0] != grpc.StatusCode.RESOURCE_EXHAUSTED
