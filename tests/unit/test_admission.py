"""Admission: a bound on checks in flight, in all and per tenant (transport/_admission.py)."""

from __future__ import annotations

import pytest

from budgetwarden.transport import Admission


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


class Clock:
    """Monotonic seconds, moved by the test."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def finish_one(admission: Admission, clock: Clock, seconds: float, tenant: str = "acme") -> None:
    """A check that takes ``seconds`` of the clock."""
    entered_at = clock()
    assert admission.enter(tenant, 60.0) is None
    clock.now += seconds
    admission.leave(tenant, entered_at)


def test_a_check_with_less_deadline_left_than_a_check_takes_is_shed() -> None:
    clock = Clock()
    admission = Admission(512, 0.75, clock)
    finish_one(admission, clock, 0.4)  # checks take 400 ms now
    refused = admission.enter("acme", 0.3)
    assert refused == "a check takes this sidecar 400 ms now, 300 ms were left of this one's deadline"
    assert admission.in_flight == 0  # not counted
    assert admission.enter("acme", 0.5) is None  # enough left


def test_a_check_whose_deadline_passed_is_shed_even_before_any_check_finished() -> None:
    admission = Admission(512, 0.75, Clock())
    assert "0 ms were left" in (admission.enter("acme", -0.01) or "")
    assert admission.enter("acme", 0.001) is None
    assert admission.enter("acme", None) is None  # no deadline: only the bounds apply


def test_the_expected_time_is_an_average_of_the_recent_checks() -> None:
    clock = Clock()
    admission = Admission(512, 0.75, clock)
    finish_one(admission, clock, 1.0)
    assert admission.expected_seconds() == 1.0  # the first check's time
    for _ in range(200):
        finish_one(admission, clock, 0.01)  # faster checks pull it down
    assert 0.01 <= admission.expected_seconds() < 0.011


def test_the_expected_time_fades_while_no_check_finishes() -> None:
    clock = Clock()
    admission = Admission(512, 0.75, clock)
    finish_one(admission, clock, 4.0)  # a slow spell: the store stalled
    assert admission.enter("acme", 2.0) is not None
    clock.now += 4.0  # as long as a check takes: one may still finish
    assert admission.expected_seconds() == 4.0
    clock.now += 4.0  # then it halves every 4 s (the average itself)
    assert admission.expected_seconds() == pytest.approx(2.0)
    clock.now += 4.0
    assert admission.enter("acme", 2.0) is None  # shed checks do not keep it high for ever


def test_the_fading_half_life_is_at_least_a_second() -> None:
    clock = Clock()
    admission = Admission(512, 0.75, clock)
    finish_one(admission, clock, 0.2)
    clock.now += 0.2 + 1.0
    assert admission.expected_seconds() == pytest.approx(0.1)


def test_an_unbounded_admission_sheds_nothing_for_deadlines() -> None:
    clock = Clock()
    admission = Admission(0, 0.75, clock)
    finish_one(admission, clock, 5.0)
    assert admission.enter("acme", 0.1) is None
    assert admission.enter("acme", -1.0) is None
