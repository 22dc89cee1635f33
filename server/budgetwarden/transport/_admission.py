"""Admission: how many checks this sidecar works on at once, in all and per tenant, and whether it can still answer.

Without a bound, a sidecar offered more checks than its store answers queues them all: every answer comes late, and
callers give up on answers that are still computed. With it, a check beyond the bound is answered at once (shed), so
the admitted ones keep their latency, and one tenant cannot take every slot of a sidecar that serves several: each
may hold at most its share of the bound, which leaves the rest to the others.

A count of checks in flight does not see every queue, though: when the sidecar's own CPU is what runs out, calls wait
in the event loop before their handler starts (to be received, parsed, admitted), and the count stays low while every
answer comes late. So admission also watches how late the loop runs its callbacks (``LoopLag``): a check takes a few
turns of the loop, and once one turn is late by more than ``lag_limit_s`` a check could no longer be answered in its
deadline. Then a check is shed unless its tenant has none in flight or fewer than the average tenant in flight: the
noisiest tenants are shed first, and a quiet tenant still gets in.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable

# How many turns of the event loop a check takes (received, parsed, the store's answer, sent), about: a loop that is
# late by more than the check deadline over this many is too late for the check.
CHECK_LOOP_TURNS = 5
# ... but a loop is never held too late below this: a pause this short (a garbage collection, a busy host) passes
# before it could be acted on, and shedding for it would refuse checks that are answered in time.
MIN_LAG_LIMIT_S = 0.05


class LoopLag:
    """How late the running event loop is right now: a callback every ``interval_s`` notes how late it ran, and a
    callback overdue at this moment counts as late by as much. Starts on the first call from inside a loop; 0 outside
    one."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0
        self._last = 0.0

    def __call__(self) -> float:
        loop = self._loop or self._start()
        if loop is None:
            return 0.0
        return max(self._last, loop.time() - self._due)

    def _start(self) -> asyncio.AbstractEventLoop | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        self._loop = loop
        self._due = loop.time() + self.interval_s
        loop.call_at(self._due, self._tick)
        return loop

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self._last = max(0.0, now - self._due)
        self._due = now + self.interval_s
        self._loop.call_at(self._due, self._tick)


class Admission:
    """Counts checks in flight; ``enter`` says whether one more may start, ``leave`` ends one. Event-loop only (no
    locks): every call is made from the loop's thread.

    ``max_in_flight`` 0: no bound, nothing is shed. ``lag_limit_s`` (0: not watched) is how late the event loop may
    run before checks of the busiest tenants are shed; ``loop_lag`` measures that (a ``LoopLag`` unless given)."""

    def __init__(
        self,
        max_in_flight: int,
        tenant_share: float,
        lag_limit_s: float = 0.0,
        loop_lag: Callable[[], float] | None = None,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.max_per_tenant = max(1, math.floor(max_in_flight * tenant_share))
        self.lag_limit_s = lag_limit_s
        self.loop_lag = loop_lag or LoopLag()
        self.in_flight = 0
        self.by_tenant: Counter[str] = Counter()

    @classmethod
    def for_deadline(cls, max_in_flight: int, tenant_share: float, check_deadline_s: float) -> Admission:
        """An admission that sheds once the loop is too late for a check to be answered within ``check_deadline_s``."""
        return cls(max_in_flight, tenant_share, lag_limit_s=max(MIN_LAG_LIMIT_S, check_deadline_s / CHECK_LOOP_TURNS))

    @property
    def bounded(self) -> bool:
        return self.max_in_flight > 0

    def refusal(self, tenant_id: str) -> str | None:
        """Why a check of ``tenant_id`` may not start now, or None when it may."""
        if not self.bounded:
            return None
        if self.in_flight >= self.max_in_flight:
            return f"this sidecar is at its bound of {self.max_in_flight} checks in flight"
        if self.by_tenant[tenant_id] >= self.max_per_tenant:
            return (
                f"tenant {tenant_id!r} has {self.max_per_tenant} checks in flight, its share of this sidecar's "
                f"{self.max_in_flight}"
            )
        if self.lag_limit_s > 0:
            return self._lag_refusal(tenant_id)
        return None

    def _lag_refusal(self, tenant_id: str) -> str | None:
        lag = self.loop_lag()
        if lag <= self.lag_limit_s:
            return None
        held = self.by_tenant[tenant_id]
        # A tenant with nothing in flight, or less than the average tenant in flight, gets in: the busiest are shed
        # first, and every tenant keeps one check going.
        average = self.in_flight / max(1, len(self.by_tenant))
        if held == 0 or held < average:
            return None
        return (
            f"this sidecar runs {lag * 1000:.0f} ms behind (more than {self.lag_limit_s * 1000:.0f} ms, too late to "
            f"answer checks in their deadline), and tenant {tenant_id!r} has {held} of its {self.in_flight} checks "
            "in flight"
        )

    def enter(self, tenant_id: str) -> str | None:
        """Start a check (None) or say why not (nothing is counted then)."""
        refused = self.refusal(tenant_id)
        if refused is None:
            self.in_flight += 1
            self.by_tenant[tenant_id] += 1
        return refused

    def leave(self, tenant_id: str) -> None:
        self.in_flight -= 1
        self.by_tenant[tenant_id] -= 1
        if not self.by_tenant[tenant_id]:
            del self.by_tenant[tenant_id]  # the counter holds only tenants with checks in flight
