"""The rules of a local allowance, pure (docs/local-allowance.md): how big a slice a sidecar takes of a task's budget,
which checks it may decide from the slice, and how much budget slices can strand at most. lua/allowance.lua applies
``slice_size`` atomically; these are the same rules for the sidecar, the tests and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass

from ._decision import Bound, Candidate, CheckPlan
from ._model import Amount

FULL_BP = 10_000


def slice_size(left: int | None, cap: int | None, share_bp: int) -> int | None:
    """A slice in one unit: ``min(cap, share of what is left)`` (None: neither the cap nor any scope limits the unit).
    ``left`` is the least room over the task (under its lowest line) and the tenant's windows."""
    if left is None:
        return cap
    share = left * share_bp // FULL_BP
    return share if cap is None else min(cap, share)


@dataclass(slots=True)
class SliceLeft:
    """What a held slice has left for local grants; ``usd`` None: cost is not sliced (no scope limits it)."""

    tokens: int
    usd: int | None

    def fits(self, amount: Amount) -> bool:
        return amount.tokens <= self.tokens and (self.usd is None or amount.usd <= self.usd)

    def take(self, amount: Amount) -> None:
        assert self.fits(amount)
        self.tokens -= amount.tokens
        if self.usd is not None:
            self.usd -= amount.usd


def cost_slice_bp(tokens: int, left: int | None, share_bp: int) -> int:
    """The share of the cost room a slice takes (basis points): the share of the token room its tokens are (the token
    cap binding makes the cost slice smaller too); ``share_bp`` when no scope limits tokens. Floating point, rounded
    down and at most the whole room, as lua/allowance.lua computes it."""
    if left is None:
        return share_bp
    return min(FULL_BP, int(tokens / left * FULL_BP)) if left > 0 else 0


def local_candidate(plan: CheckPlan, left: SliceLeft) -> Candidate | None:
    """The candidate a check may be granted from a slice without the store, or None (the store decides).

    Only the step as asked (no rung) that fits what the slice has left: the slice was cut under the task's lowest line
    (soft threshold, else checkpoint threshold) and inside every window, so such a grant crosses no threshold and
    needs no degrade ladder. A degrade, a checkpoint, a denial are decided by the store, from all the counters."""
    if plan.early is not None or not plan.candidates:
        return None
    first = plan.candidates[0]
    if first.rung is not None or first.bound is not Bound.SOFT or not left.fits(first.amount):
        return None
    return first


def stranded_bound(left: int, cap: int, share_bp: int, holders: int) -> int:
    """The most budget ``holders`` slices can hold unused at once when each took ``min(cap, share of what was left)``
    one after another from ``left``: left minus what the last one leaves, and at most holders x cap."""
    rest = left
    for _ in range(holders):
        rest -= min(cap, rest * share_bp // FULL_BP)
    return left - rest
