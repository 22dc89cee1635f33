"""Admission: a bound on checks in flight, in all and per tenant (transport/_admission.py)."""

from __future__ import annotations

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
