"""Admission: a bound on checks in flight, in all and per tenant (transport/_admission.py)."""

from __future__ import annotations

import asyncio
import time

from budgetwarden.transport import Admission
from budgetwarden.transport._admission import LoopLag


def test_no_bound_admits_everything() -> None:
    admission = Admission(0, 0.5)
    assert all(admission.enter("acme") is None for _ in range(10_000))


def test_a_tenant_holds_at_most_its_share_and_the_others_get_the_rest() -> None:
    admission = Admission(4, 0.5)
    assert [admission.enter("noisy") for _ in range(2)] == [None, None]
    assert "tenant 'noisy' has 2 checks in flight, its share of this sidecar's 4" in (admission.enter("noisy") or "")
    assert [admission.enter("quiet") for _ in range(2)] == [None, None]
    assert "at its bound of 4 checks in flight" in (admission.enter("third") or "")
    admission.leave("noisy")
    assert admission.enter("third") is None  # a slot freed is anyone's
    assert (admission.in_flight, dict(admission.by_tenant)) == (4, {"noisy": 1, "quiet": 2, "third": 1})


def test_a_refused_check_is_not_counted_and_leaving_frees_its_slot() -> None:
    admission = Admission(1, 1.0)
    assert admission.enter("acme") is None
    assert admission.enter("acme") is not None
    admission.leave("acme")
    assert (admission.in_flight, dict(admission.by_tenant)) == (0, {})
    assert admission.enter("acme") is None


def test_every_tenant_may_hold_at_least_one_check() -> None:
    assert Admission(3, 0.1).max_per_tenant == 1


class SettableLag:
    """How late the event loop runs, as a test sets it (seconds)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def test_a_late_loop_sheds_the_busiest_tenant_and_lets_a_quiet_one_in() -> None:
    """Issue 16, overload: in-flight counts stay low while calls wait in the event loop before their handler, so the
    loop's lateness is watched too. Past the limit, a tenant at or above the average in flight is shed; one below it,
    or with nothing in flight, gets in."""
    lag = SettableLag()
    admission = Admission(512, 0.75, lag_limit_s=0.05, loop_lag=lag)
    assert [admission.enter("noisy") for _ in range(4)] == [None] * 4
    lag.seconds = 0.2
    refused = admission.enter("noisy") or ""
    assert refused.startswith("this sidecar runs 200 ms behind (more than 50 ms"), refused
    assert "tenant 'noisy' has 4 of its 4 checks in flight" in refused
    assert admission.enter("quiet") is None  # nothing in flight: one check always goes
    assert admission.enter("quiet") is None  # 1 below the average of 5 / 2
    assert admission.enter("quiet") is None  # 2 below 6 / 2
    assert admission.enter("quiet") is None  # 3 below 7 / 2
    assert admission.enter("quiet") is not None  # 4 is not below 8 / 2
    assert admission.enter("noisy") is not None
    lag.seconds = 0.05  # at the limit, not past it
    assert admission.enter("noisy") is None
    assert (admission.in_flight, dict(admission.by_tenant)) == (9, {"noisy": 5, "quiet": 4})


def test_a_late_loop_still_lets_a_tenant_with_nothing_in_flight_start_one_check() -> None:
    lag = SettableLag()
    lag.seconds = 10.0
    admission = Admission(512, 0.75, lag_limit_s=0.05, loop_lag=lag)
    assert admission.enter("only") is None
    assert admission.enter("only") is not None
    admission.leave("only")
    assert admission.enter("only") is None


def test_no_bound_sheds_nothing_however_late_the_loop() -> None:
    lag = SettableLag()
    lag.seconds = 10.0
    admission = Admission(0, 0.75, lag_limit_s=0.05, loop_lag=lag)
    assert all(admission.enter("acme") is None for _ in range(100))


def test_the_lag_limit_is_a_share_of_the_check_deadline_with_a_floor() -> None:
    assert Admission.for_deadline(512, 0.75, 0.25).lag_limit_s == 0.05
    assert Admission.for_deadline(512, 0.75, 1.0).lag_limit_s == 0.2
    assert Admission.for_deadline(512, 0.75, 0.01).lag_limit_s == 0.05


async def test_loop_lag_sees_a_loop_that_was_blocked() -> None:
    lag = LoopLag(interval_s=0.01)
    assert lag() < 1.0  # started here, on this loop
    time.sleep(0.3)  # noqa: ASYNC251 -- blocks the loop on purpose: the callback due in 10 ms cannot run
    assert lag() >= 0.25
    # Once the loop runs again, its callbacks run about on time (within a generous bound on a busy machine).
    async with asyncio.timeout(30):
        while lag() >= 0.25:  # noqa: ASYNC110 -- polling a measurement, not waiting for an event
            await asyncio.sleep(0.01)


def test_loop_lag_outside_a_loop_is_zero() -> None:
    assert LoopLag()() == 0.0
