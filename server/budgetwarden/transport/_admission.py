"""Admission: how many checks this sidecar works on at once, in all and per tenant, and whether a check can still be
answered within its deadline.

Without a bound, a sidecar offered more checks than its store answers queues them all: every answer comes late, and
callers give up on answers that are still computed. With it, a check beyond the bound is answered at once (shed), so
the admitted ones keep their latency, and one tenant cannot take every slot of a sidecar that serves several: each
may hold at most its share of the bound, which leaves the rest to the others.

The bound counts only checks whose handler runs. Offered more than its CPU serves, the sidecar's queue forms before
that, in gRPC (bench/overload.py under h2load: a few dozen checks in flight, but checks reaching the handler with
almost none of their deadline left); --max-pending-calls bounds that queue (gRPC's options, app/_sidecar.py). Whatever
gets through it, a check is also shed when the time a check takes here now
(an exponentially weighted average of the last checks' times, measured by this sidecar) exceeds what is left of its
deadline: its answer would come too late, and the store call and the fail mode's answer are saved for the checks that
can still use theirs. The average fades while no check finishes, so one slow spell (a store outage) cannot shed every
later check for ever.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable

# Weight of the newest check's time in the average: about the last 20 checks count.
DURATION_WEIGHT = 0.05
# With no check finished for longer than the average itself, it then halves every max(itself, this) seconds: it goes
# back to what checks take once a slow spell is over, though shed checks tell it nothing.
MIN_HALF_LIFE_S = 1.0


class Admission:
    """Counts checks in flight; ``enter`` says whether one more may start, ``leave`` ends one. Event-loop only (no
    locks): every call is made from the loop's thread. ``clock``: monotonic seconds (injected in tests)."""

    def __init__(self, max_in_flight: int, tenant_share: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_in_flight = max_in_flight
        self.max_per_tenant = max(1, math.floor(max_in_flight * tenant_share))
        self.in_flight = 0
        self.by_tenant: Counter[str] = Counter()
        self.clock = clock
        self.check_seconds = 0.0  # the average time of a check (0 until one finished)
        self.measured_at = 0.0  # when it last took a check's time

    @property
    def bounded(self) -> bool:
        return self.max_in_flight > 0

    def expected_seconds(self) -> float:
        """How long a check starting now is expected to take: the average, faded if no check finished for long."""
        if not self.check_seconds:
            return 0.0
        # A check should have finished within the average's time: only a longer silence says it is out of date.
        silent = max(0.0, self.clock() - self.measured_at - self.check_seconds)
        fade: float = 0.5 ** (silent / max(self.check_seconds, MIN_HALF_LIFE_S))
        return self.check_seconds * fade

    def refusal(self, tenant_id: str, remaining_s: float | None = None) -> str | None:
        """Why a check of ``tenant_id`` with ``remaining_s`` left of its deadline (None: no deadline) may not start
        now, or None when it may."""
        if not self.bounded:
            return None
        if self.in_flight >= self.max_in_flight:
            return f"this sidecar is at its bound of {self.max_in_flight} checks in flight"
        if self.by_tenant[tenant_id] >= self.max_per_tenant:
            return (
                f"tenant {tenant_id!r} has {self.max_per_tenant} checks in flight, its share of this sidecar's "
                f"{self.max_in_flight}"
            )
        if remaining_s is not None and remaining_s < (expected := self.expected_seconds()):
            return (
                f"a check takes this sidecar {expected * 1000:.0f} ms now, {max(0.0, remaining_s) * 1000:.0f} ms "
                "were left of this one's deadline"
            )
        return None

    def enter(self, tenant_id: str, remaining_s: float | None = None) -> str | None:
        """Start a check (None) or say why not (nothing is counted then)."""
        refused = self.refusal(tenant_id, remaining_s)
        if refused is None:
            self.in_flight += 1
            self.by_tenant[tenant_id] += 1
        return refused

    def leave(self, tenant_id: str, entered_at: float | None = None) -> None:
        """End a check; ``entered_at`` (this clock's time before ``enter``) adds its time to the average."""
        self.in_flight -= 1
        self.by_tenant[tenant_id] -= 1
        if not self.by_tenant[tenant_id]:
            del self.by_tenant[tenant_id]  # the counter holds only tenants with checks in flight
        if entered_at is not None:
            now = self.clock()
            took = max(0.0, now - entered_at)
            current = self.expected_seconds()
            self.check_seconds = current + DURATION_WEIGHT * (took - current) if self.check_seconds else took
            self.measured_at = now
