"""Client-side adaptive throttling (issue 16) over a real socket: a sidecar that refuses every check for overload
(its one check slot held by a check waiting for a frozen store) gets few of a client's checks, the rest answered by
the client's fail mode without a call; once the store answers again and the refusals leave the throttle's window, the
client sends every check again.

The throttle runs on an injected clock and random source, so which checks are sent is fixed by the test; the calls
that reached the sidecar are counted by an interceptor on the client's channel."""

from __future__ import annotations

import concurrent.futures
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from budgetwarden.store._embedded import EmbeddedRedis
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_api.v1 import budget_pb2_grpc as pb_grpc
from budgetwarden_client import AdaptiveThrottle, Budget, BudgetClient

from support import RunningSidecar, free_port, wait_until
from support_faults import RedisFaults

RPC_TIMEOUT_S = 120.0  # the client's deadline: far beyond anything the sidecar's deadline-aware shedding expects
HOLD_MS = 60_000  # the held check waits for the frozen store this long at most (the test thaws it long before)
WINDOW_S = 120.0
STEPS = 100
SEED = 16


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class CountChecks(grpc.UnaryUnaryClientInterceptor):
    """Counts the Check calls that leave the client: the ones the sidecar receives."""

    def __init__(self) -> None:
        self.sent = 0

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        if client_call_details.method.endswith("/Check"):
            self.sent += 1
        return continuation(client_call_details, request)


def counted(budget: Budget) -> CountChecks:
    """Puts a counting interceptor on the Budget's channel (the stub its steps call)."""
    counter = CountChecks()
    budget.client._stub = pb_grpc.BudgetServiceStub(grpc.intercept_channel(budget.client._channel, counter))
    return counter


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A store of this test's own: it is frozen (SIGSTOP) for a while, which the session's shared one must not be."""
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), persistent=False)
    server.start()
    yield server
    RedisFaults(server).resume()  # harmless when it runs; a failed test must not leave it frozen
    server.stop()


def hold_the_only_slot(running: RunningSidecar, pool: concurrent.futures.ThreadPoolExecutor) -> Any:
    """A check of another client, in flight until the store answers: every other check is refused for overload."""

    def check() -> pb.CheckResponse:
        with BudgetClient(running.addr, timeout=RPC_TIMEOUT_S) as client:
            return client.check(tenant_id="acme", task_id="held", step_id="s0", estimated_input_tokens=10)

    held = pool.submit(check)
    assert running.sidecar is not None
    assert running.sidecar.servicer is not None
    admission = running.sidecar.servicer.admission
    wait_until(lambda: admission.in_flight == 1, "the held check is in flight")
    return held


def run_steps(budget: Budget, prefix: str, count: int) -> list[bool]:
    """Whether each of ``count`` steps got the fail mode's answer (True) or a decision (False)."""
    out = []
    for n in range(count):
        with budget.step("t", f"{prefix}{n}", model="small", estimated_input_tokens=10) as step:
            out.append(step.from_fail_mode)
    return out


def test_a_client_refused_for_overload_stops_sending_most_checks_and_sends_again_after(
    start_sidecar: Callable[..., RunningSidecar], store: EmbeddedRedis
) -> None:
    running = start_sidecar(
        redis_url=store.url,
        max_checks_in_flight=1,
        check_deadline_ms=HOLD_MS,
        store_deadline_ms=HOLD_MS,
        shutdown_grace_seconds=0,
    )
    clock = Clock()
    throttle = AdaptiveThrottle(window=WINDOW_S, clock=clock, random=random.Random(SEED).random)
    faults = RedisFaults(store)
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        Budget(running.addr, tenant_id="acme", timeout=RPC_TIMEOUT_S, fail_mode="open", throttle=throttle) as budget,
    ):
        counter = counted(budget)
        faults.stop()
        held = hold_the_only_slot(running, pool)

        assert all(run_steps(budget, "over", STEPS))  # every step: the open fail mode (refused, or throttled)
        sent = counter.sent
        assert 1 <= sent <= STEPS // 5, f"{sent} of {STEPS} checks reached a sidecar that refuses them all"
        assert throttle.throttled == STEPS - sent
        assert throttle.counts() == (STEPS, 0)

        faults.resume()
        assert not held.result(RPC_TIMEOUT_S).from_fail_mode  # the store decided it: the slot was held throughout
        clock.now += WINDOW_S + 2 * WINDOW_S / 60  # the refusals leave the window (a slice at a time)
        assert not any(run_steps(budget, "after", 20))  # every step decided by the sidecar
        assert counter.sent == sent + 20
        assert throttle.throttled == STEPS - sent
        assert throttle.counts() == (20, 20)


def test_without_the_throttle_every_refused_check_is_sent(
    start_sidecar: Callable[..., RunningSidecar], store: EmbeddedRedis
) -> None:
    """What the throttle saves: the same overload with ``throttle=False`` sends every check to be refused."""
    running = start_sidecar(
        redis_url=store.url,
        max_checks_in_flight=1,
        check_deadline_ms=HOLD_MS,
        store_deadline_ms=HOLD_MS,
        shutdown_grace_seconds=0,
    )
    faults = RedisFaults(store)
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        Budget(running.addr, tenant_id="acme", timeout=RPC_TIMEOUT_S, fail_mode="open", throttle=False) as budget,
    ):
        counter = counted(budget)
        faults.stop()
        held = hold_the_only_slot(running, pool)
        assert all(run_steps(budget, "over", 20))
        assert counter.sent == 20
        faults.resume()
        assert not held.result(RPC_TIMEOUT_S).from_fail_mode  # the store decided it: the slot was held throughout
