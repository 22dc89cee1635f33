"""Client-side adaptive throttling (issue 16; Google SRE book, "Handling Overload"): the throttle's arithmetic on an
injected clock and random source, and what the step API answers for a check it throttles (no sidecar needed: the
throttled check is never sent)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from budgetwarden_client import AdaptiveThrottle, AsyncBudget, Budget, BudgetUnavailable

from support import free_port

WINDOW_S = 120.0


class Clock:
    """Monotonic seconds that stand still until moved."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def fixed(value: float) -> Iterator[float]:
    while True:
        yield value


def throttle(clock: Clock, draw: float = 0.5, k: float = 2.0) -> AdaptiveThrottle:
    """A throttle whose every random draw is ``draw``: a check is throttled exactly when the probability exceeds it."""
    draws = fixed(draw)
    return AdaptiveThrottle(k=k, window=WINDOW_S, clock=clock, random=lambda: next(draws))


def refused(t: AdaptiveThrottle, count: int) -> None:
    """``count`` checks sent (or throttled) and refused for overload: requests without accepts."""
    for _ in range(count):
        t.admit()


def answered(t: AdaptiveThrottle, count: int) -> None:
    for _ in range(count):
        assert t.admit()
        t.accepted()


def test_a_sidecar_that_answers_is_never_throttled() -> None:
    t = throttle(Clock(), draw=0.0)  # the lowest draw: any probability above 0 would throttle
    answered(t, 1_000)
    assert t.probability() == 0.0
    assert t.throttled == 0


def test_the_probability_is_requests_less_k_accepts_over_requests_plus_one() -> None:
    t = throttle(Clock(), draw=1.0)  # never throttles, so the counts are exactly the ones made here
    refused(t, 75)
    answered(t, 25)
    assert t.counts() == (100, 25)
    assert t.probability() == pytest.approx((100 - 2 * 25) / 101)


def test_nothing_is_throttled_until_more_than_one_in_k_is_refused() -> None:
    t = throttle(Clock(), draw=0.0)
    for _ in range(50):
        answered(t, 1)
        refused(t, 1)  # half refused, k=2: requests == 2 * accepts
    assert t.probability() == 0.0
    assert t.throttled == 0
    lenient = throttle(Clock(), draw=0.0, k=4.0)
    answered(lenient, 1)
    refused(lenient, 3)
    assert lenient.probability() == 0.0  # three in four refused is within k=4
    assert lenient.throttled == 0


def test_checks_refused_for_overload_are_mostly_throttled_and_counted() -> None:
    t = throttle(Clock(), draw=0.5)
    sent = sum(t.admit() for _ in range(100))  # every sent one refused: never accepted
    # p = n / (n + 1) after n requests: above the draw of 0.5 from the third request on.
    assert sent == 2
    assert t.throttled == 98
    assert t.counts() == (100, 0)  # throttled checks count as requests: the probability keeps rising
    assert t.probability() == pytest.approx(100 / 101)


def test_refusals_leave_the_window_and_the_throttle_opens_again() -> None:
    clock = Clock()
    t = throttle(clock, draw=0.5)
    refused(t, 100)
    clock.now += WINDOW_S / 2
    refused(t, 100)
    assert t.counts() == (200, 0)
    clock.now += WINDOW_S / 2 + 2  # the first hundred left the window (a slice of 2 s at a time)
    assert t.counts() == (100, 0)
    clock.now += WINDOW_S
    assert t.counts() == (0, 0)
    assert t.probability() == 0.0
    assert t.admit()


def test_accepts_bring_the_probability_down_before_the_window_ends() -> None:
    t = throttle(Clock(), draw=0.0)
    refused(t, 100)
    before = t.probability()
    for _ in range(20):
        t.accepted()  # what the few sent checks get once the sidecar answers again
    assert t.probability() == pytest.approx((100 - 40) / 101)
    assert t.probability() < before


@pytest.mark.parametrize(("k", "window"), [(0.5, WINDOW_S), (float("nan"), WINDOW_S), (2.0, 0.0), (2.0, -1.0)])
def test_bad_settings_are_refused_naming_them(k: float, window: float) -> None:
    with pytest.raises(ValueError, match="k must be" if window > 0 else "window must be"):
        AdaptiveThrottle(k=k, window=window)


def nobody_listens() -> str:
    return f"127.0.0.1:{free_port()}"


def test_the_step_api_throttles_by_default_with_k_2_over_two_minutes() -> None:
    with Budget(nobody_listens(), tenant_id="acme") as budget:
        assert budget.throttle is not None
        assert (budget.throttle.k, budget.throttle.window) == (2.0, 120.0)
    with Budget(nobody_listens(), tenant_id="acme", throttle=False) as budget:
        assert budget.throttle is None
    with pytest.raises(ValueError, match="throttle must be"):
        Budget(nobody_listens(), tenant_id="acme", throttle="yes")  # type: ignore[arg-type]


def loaded(draw: float) -> AdaptiveThrottle:
    """A throttle that has seen a hundred refusals: it throttles a check unless ``draw`` is above 100/101."""
    t = throttle(Clock(), draw=draw)
    refused(t, 100)
    return t


def test_a_throttled_step_gets_the_closed_fail_mode_without_a_call() -> None:
    t = loaded(draw=0.0)
    before = t.throttled
    throttled = r"not sent .* refused for overload \(client-side throttling\)"
    with (
        Budget(nobody_listens(), tenant_id="acme", throttle=t) as budget,
        pytest.raises(BudgetUnavailable, match=throttled),
        budget.step("t", "s1", estimated_input_tokens=10),
    ):
        pytest.fail("must not run")
    assert t.throttled == before + 1


def test_a_throttled_step_runs_under_the_open_fail_mode_marked() -> None:
    t = loaded(draw=0.0)
    before = t.throttled
    with (
        Budget(nobody_listens(), tenant_id="acme", fail_mode="open", throttle=t) as budget,
        budget.step("t", "s1", model="small", estimated_input_tokens=10) as step,
    ):
        assert step.from_fail_mode
        assert step.model == "small"
    assert t.throttled == before + 1


async def test_the_async_step_api_throttles_the_same_way() -> None:
    t = loaded(draw=0.0)
    before = t.throttled
    async with (
        AsyncBudget(nobody_listens(), tenant_id="acme", fail_mode="open", throttle=t) as budget,
        budget.step("t", "s1", estimated_input_tokens=10) as step,
    ):
        assert step.from_fail_mode
    assert t.throttled == before + 1
