"""Admission: how many checks this sidecar works on at once, in all and per tenant.

Without a bound, a sidecar offered more checks than its store answers queues them all: every answer comes late, and
callers give up on answers that are still computed. With it, a check beyond the bound is answered at once (shed), so
the admitted ones keep their latency, and one tenant cannot take every slot of a sidecar that serves several: each
may hold at most its share of the bound, which leaves the rest to the others.
"""

from __future__ import annotations

import math
from collections import Counter


class Admission:
    """Counts checks in flight; ``enter`` says whether one more may start, ``leave`` ends one. Event-loop only (no
    locks): every call is made from the loop's thread."""

    def __init__(self, max_in_flight: int, tenant_share: float) -> None:
        self.max_in_flight = max_in_flight
        self.max_per_tenant = max(1, math.floor(max_in_flight * tenant_share))
        self.in_flight = 0
        self.by_tenant: Counter[str] = Counter()

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
        return None

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
