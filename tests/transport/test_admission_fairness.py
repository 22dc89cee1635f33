"""Fair share under CPU overload (issue 16): while the event loop is busy past the threshold, a tenant that took at
least its max-min fair share of the checks admitted lately is shed first, and tenants under their share are admitted
(transport/_admission.py). The clock is injected; the loop's busy share is given as samples, as the sidecar's watcher
takes them."""

from __future__ import annotations

import asyncio
import math

import pytest

from budgetwarden.transport import Admission
from budgetwarden.transport._admission import BUSY_WEIGHT, FAIR_HALF_LIFE_S, fair_level

BUSY = 0.9  # the threshold these tests set


class Clock:
    """Monotonic seconds, moved by the test."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def overload(admission: Admission) -> None:
    """Busy samples until the average is over the threshold."""
    for _ in range(50):
        admission.note_loop_busy(1.0)
    assert admission.overloaded()


def recover(admission: Admission) -> None:
    for _ in range(50):
        admission.note_loop_busy(0.0)
    assert not admission.overloaded()


def admit(admission: Admission, tenant: str, count: int) -> None:
    """``count`` checks of ``tenant`` admitted and finished at once."""
    for _ in range(count):
        assert admission.enter(tenant) is None
        admission.leave(tenant)


def outcomes(admission: Admission, tenant: str, count: int) -> list[str | None]:
    """The reasons of ``count`` checks of ``tenant`` (None: admitted), each finished at once."""
    reasons: list[str | None] = []
    for _ in range(count):
        refused = admission.enter(tenant)
        if refused is None:
            admission.leave(tenant)
        reasons.append(None if refused is None else refused.reason)
    return reasons


def test_the_fair_level_gives_small_tenants_all_they_ask_and_splits_the_rest() -> None:
    assert fair_level([10, 1000], 500) == 490
    assert fair_level([100, 100, 1000], 600) == 400
    assert fair_level([400, 400], 600) == 300
    assert fair_level([10, 20], 100) == math.inf  # all fit: nobody is over a share
    assert fair_level([], 0) == math.inf


def test_under_overload_the_noisy_tenant_is_shed_and_the_quiet_one_admitted() -> None:
    clock = Clock()
    admission = Admission(512, 0.75, clock, overload_busy=BUSY)
    for _ in range(10):  # a second of traffic: 100 noisy checks and 5 quiet ones every 0.1 s
        admit(admission, "noisy", 100)
        admit(admission, "quiet", 5)
        clock.now += 0.1
    overload(admission)

    refused = admission.enter("noisy")
    assert refused is not None
    assert refused.reason == "fair_share"
    assert refused.startswith("this sidecar's CPU is behind (its event loop busy 100% of the time) and tenant 'noisy'")
    assert " took 95% of the checks admitted lately" in refused
    assert refused.endswith("at least its fair share of 95% among the 2 tenants asking")
    assert outcomes(admission, "quiet", 5) == [None] * 5
    assert outcomes(admission, "noisy", 50) == ["fair_share"] * 50
    assert admission.in_flight == 0


def test_without_overload_nobody_is_shed_for_fairness() -> None:
    clock = Clock()
    admission = Admission(512, 0.75, clock, overload_busy=BUSY)
    admit(admission, "noisy", 1000)
    admit(admission, "quiet", 1)
    admission.note_loop_busy(1.0)  # one busy sample is not an overload: the average counts
    assert not admission.overloaded()
    assert outcomes(admission, "noisy", 100) == [None] * 100


def test_the_overload_ends_when_the_loop_catches_up() -> None:
    clock = Clock()
    admission = Admission(512, 0.75, clock, overload_busy=BUSY)
    admit(admission, "noisy", 100)
    admit(admission, "quiet", 1)
    overload(admission)
    assert outcomes(admission, "noisy", 1) == ["fair_share"]
    recover(admission)
    assert outcomes(admission, "noisy", 1) == [None]


def test_the_busy_share_is_an_average_of_samples() -> None:
    admission = Admission(512, 0.75, Clock(), overload_busy=BUSY)
    admission.note_loop_busy(1.5)  # a sample is a share: at most 1
    assert admission.loop_busy == pytest.approx(BUSY_WEIGHT)
    admission.note_loop_busy(-0.5)
    assert admission.loop_busy == pytest.approx(BUSY_WEIGHT * (1 - BUSY_WEIGHT))


def test_a_single_tenant_is_not_shed_for_fairness() -> None:
    clock = Clock()
    admission = Admission(512, 0.75, clock, overload_busy=BUSY)
    admit(admission, "only", 1000)
    overload(admission)
    assert outcomes(admission, "only", 100) == [None] * 100


def test_of_two_tenants_asking_alike_the_one_that_asked_more_lately_gives_way() -> None:
    clock = Clock()
    admission = Admission(512, 0.75, clock, overload_busy=BUSY)
    for _ in range(100):
        admit(admission, "a", 1)
        admit(admission, "b", 1)
    overload(admission)
    assert outcomes(admission, "a", 10) == ["fair_share"] * 10  # now over an equal part, and at its half
    assert outcomes(admission, "b", 10) == [None] * 10  # under an equal part of what was asked


def test_a_tenant_under_an_equal_part_gets_in_while_a_larger_one_gives_way() -> None:
    clock = Clock()
    admission = Admission(512, 0.75, clock, overload_busy=BUSY)
    for _ in range(100):
        admit(admission, "big", 6)
        admit(admission, "medium", 3)
        admit(admission, "small", 1)
    overload(admission)
    # Asked 600, 300 and 100 of 1000 admitted: the level is 450; medium may still grow, big may not.
    assert outcomes(admission, "small", 1) == [None]
    assert outcomes(admission, "medium", 1) == [None]
    assert outcomes(admission, "big", 1) == ["fair_share"]


def test_a_long_overload_sheds_the_noisy_tenant_and_never_the_quiet_one() -> None:
    clock = Clock()
    admission = Admission(512, 0.75, clock, overload_busy=BUSY)
    admit(admission, "noisy", 100)
    admit(admission, "quiet", 10)
    overload(admission)
    admitted_noisy = []
    for _ in range(40):  # 20 s of overload: the noisy tenant keeps asking 10x what the quiet one asks
        admitted_noisy.append(outcomes(admission, "noisy", 100).count(None))
        assert outcomes(admission, "quiet", 10) == [None] * 10  # though the checks admitted shrink
        clock.now += 0.5
    # With the admitted checks as the capacity, the noisy tenant's share falls to an equal part: about the quiet one's.
    assert admitted_noisy[0] == 0
    assert all(count <= 11 for count in admitted_noisy), admitted_noisy


def test_counts_fade_so_a_tenant_that_stopped_no_longer_holds_a_share() -> None:
    clock = Clock()
    admission = Admission(512, 0.75, clock, overload_busy=BUSY)
    admit(admission, "was-noisy", 1000)
    admit(admission, "steady", 10)
    clock.now += 20 * FAIR_HALF_LIFE_S  # the noisy tenant went quiet long ago
    overload(admission)
    assert outcomes(admission, "steady", 100) == [None] * 100  # the only one asking now
    assert set(admission.recent) == {"steady"}  # the idle tenant is forgotten


def test_idle_tenants_are_forgotten_without_any_overload() -> None:
    clock = Clock()
    admission = Admission(512, 0.75, clock, overload_busy=BUSY)
    for i in range(1000):
        admit(admission, f"tenant-{i}", 1)
    clock.now += 10 * FAIR_HALF_LIFE_S
    admit(admission, "now", 1)
    assert set(admission.recent) == {"now"}


def test_the_counts_stay_finite_over_a_long_run() -> None:
    clock = Clock()
    admission = Admission(512, 0.75, clock, overload_busy=BUSY)
    for _ in range(200):  # 2,000 half-lives: the scale is brought back many times
        clock.now += 10 * FAIR_HALF_LIFE_S
        admit(admission, "noisy", 10)
        admit(admission, "quiet", 1)
    overload(admission)
    assert all(math.isfinite(load.asked) for load in admission.recent.values())
    assert outcomes(admission, "quiet", 1) == [None]
    assert outcomes(admission, "noisy", 1) == ["fair_share"]


def test_no_threshold_no_fair_share() -> None:
    clock = Clock()
    admission = Admission(512, 0.75, clock)  # overload_busy 0: off
    admit(admission, "noisy", 1000)
    admit(admission, "quiet", 1)
    for _ in range(50):
        admission.note_loop_busy(1.0)
    assert not admission.overloaded()
    assert outcomes(admission, "noisy", 10) == [None] * 10


def test_the_other_bounds_keep_their_reasons() -> None:
    admission = Admission(2, 0.5, Clock(), overload_busy=BUSY)
    assert admission.enter("a") is None
    refused = admission.enter("a")
    assert refused is not None
    assert refused.reason == "tenant_in_flight"
    assert admission.enter("b") is None
    refused = admission.enter("c")
    assert refused is not None
    assert refused.reason == "in_flight"
    assert refused == "this sidecar is at its bound of 2 checks in flight"
    admission.leave("a")
    refused = admission.enter("a", -1.0)
    assert refused is not None
    assert refused.reason == "deadline"


async def test_the_watcher_measures_a_busy_loop_as_busy() -> None:
    """A loop that only runs callbacks (never waits for I/O) is measured near 100% busy; an idle one near 0. The
    shares are wide of the threshold both ways: no timing edge."""
    admission = Admission(512, 0.75, overload_busy=BUSY)
    loop = asyncio.get_running_loop()
    selector = loop._selector  # type: ignore[attr-defined]
    select = selector.select
    watcher = asyncio.create_task(admission.watch_loop(0.02))
    await asyncio.sleep(0.5)  # idle: the loop waits in its selector
    assert admission.loop_busy < 0.5, admission.loop_busy
    spinning = True

    def spin() -> None:
        if spinning:
            loop.call_soon(spin)  # never idle: always a ready callback

    spin()
    for _ in range(6000):  # waits up to a minute, in steps
        if admission.overloaded():
            break
        await asyncio.sleep(0.01)
    spinning = False
    assert admission.overloaded(), admission.loop_busy
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    assert selector.select == select  # the loop's selector as it was
