"""The small pure helpers every layer uses, each written once in the domain: micro-USD in and out, what is left."""

from __future__ import annotations

from budgetwarden.domain import (
    MAX_LIMIT_USD,
    TASK_SCOPE,
    Counter,
    ScopeKind,
    micros_to_usd,
    remaining_of,
    task_scope,
    usd_text,
    usd_to_micros,
)


def test_dollars_and_micro_usd() -> None:
    assert [usd_to_micros(0.0), usd_to_micros(1.5), usd_to_micros(0.0000024), usd_to_micros(10.0)] == [
        0,
        1_500_000,
        2,
        10_000_000,
    ]
    assert micros_to_usd(1_500_000) == 1.5
    assert usd_to_micros(micros_to_usd(MAX_LIMIT_USD)) == MAX_LIMIT_USD
    assert [usd_text(0), usd_text(1350), usd_text(10_000_000), usd_text(7)] == [
        "0.000000",
        "0.001350",
        "10.000000",
        "0.000007",
    ]


def test_what_is_left_never_goes_below_zero() -> None:
    assert remaining_of(1000, 300, 200) == 500
    assert remaining_of(1000, 1200, 0) == 0  # a report may pass the limit
    counter = Counter(limit=1000, used=900, reserved=200, limit_usd=5_000_000, used_usd=1_000_000, reserved_usd=0)
    assert (counter.remaining, counter.remaining_usd) == (0, 4_000_000)
    assert Counter(limit=None, used=5, reserved=0).remaining is None


def test_a_tasks_scope_carries_the_ceilings_of_its_counter() -> None:
    scope = task_scope(Counter(limit=5000, used=10, reserved=0, limit_usd=2_000_000))
    assert (scope.name, scope.kind, scope.limit, scope.limit_usd, scope.span) == (
        TASK_SCOPE,
        ScopeKind.TASK,
        5000,
        2_000_000,
        None,
    )
