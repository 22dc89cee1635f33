"""Admission: how many checks this sidecar works on at once, in all and per tenant, whether a check can still be
answered within its deadline, and, when the sidecar is overloaded, which tenants give way first.

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

Fair share under CPU overload: the in-flight share only helps when the store is slow (checks pile up in handlers).
When the CPU is what runs out, the queue is in gRPC and the event loop is never idle: ``watch_loop`` measures the
share of time the loop has work (it is not waiting for I/O in its selector), and the loop's lag would not show it
(bench/overload.py: a few ms at 5x, since gRPC hands calls over one by one). While that share (an average of the last
samples) is at least --overload-busy-share, a check is shed when its tenant asked for more than an equal part of the
checks asked over the last seconds and already took at least its max-min fair share of those admitted (counts that
halve every FAIR_HALF_LIFE_S): the checks admitted are divided among the tenants that asked lately, a tenant that
asked for less than the level gets all it asked for, and the rest is split among the others. The noisy tenant gives
way and its refusal (no store call) costs less than a check, so the loop gets idle moments again, gRPC's own queue
stays shorter and more calls reach a handler that knows their tenant; once the loop has slack, every tenant is
admitted again, so the load follows what the CPU serves. A sidecar bound to one tenant, or asked by one tenant only,
sheds nothing for fairness: there is no one to be fair to. Where receiving the calls alone takes the whole CPU, gRPC
still refuses blind (--max-pending-calls), whatever the tenant. A refusal costs about half a check (gRPC's per-call
work in Python), so fairness costs throughput: it is off unless --overload-busy-share is set (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Weight of the newest check's time in the average: about the last 20 checks count.
DURATION_WEIGHT = 0.05
# With no check finished for longer than the average itself, it then halves every max(itself, this) seconds: it goes
# back to what checks take once a slow spell is over, though shed checks tell it nothing.
MIN_HALF_LIFE_S = 1.0
# The fair share looks at the last few seconds: a tenant's counts of checks asked and admitted halve every this long.
FAIR_HALF_LIFE_S = 1.0
# A tenant whose checks asked (so decayed) fall under this is no longer active, and forgotten.
ACTIVE_MIN_CHECKS = 0.5
# How often the event loop's busy share is sampled, and the weight of the newest sample in its average (about the last
# 5 samples, half a second, count: one garbage collection or slow callback does not make an overload).
BUSY_PERIOD_S = 0.1
BUSY_WEIGHT = 0.2
# Decayed counts are kept scaled by 2 ** (elapsed / FAIR_HALF_LIFE_S) so that a check adds to one tenant in O(1);
# they are brought back to scale before the factor grows past what a float holds well.
MAX_SCALE_EXPONENT = 600.0


class LoopIdleMeter:
    """Counts the time an asyncio event loop waits in its selector for I/O: the only time it has nothing to do. The
    loop has no public hook for this, so the selector's ``select`` is wrapped (asyncio's selector event loops; on
    another loop nothing is measured and the loop counts as never busy)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.seconds = 0.0
        self.selector = getattr(loop, "_selector", None)
        self.select = getattr(self.selector, "select", None)
        self.measuring = self.select is not None
        if self.measuring:
            self.selector.select = self.timed_select  # type: ignore[union-attr]

    def timed_select(self, timeout: float | None = None) -> Any:
        assert self.select is not None
        if timeout is not None and timeout <= 0:
            return self.select(timeout)  # a poll between callbacks: the loop has work, this is part of it
        started = time.perf_counter()
        try:
            return self.select(timeout)
        finally:
            self.seconds += time.perf_counter() - started

    def close(self) -> None:
        """Stop measuring: the selector's ``select`` as it was."""
        if self.measuring:
            self.selector.select = self.select  # type: ignore[union-attr]
            self.measuring = False


class Refusal(str):
    """Why a check may not start (the text of its RESOURCE_EXHAUSTED), with ``reason``, the shed metric's label:
    ``in_flight``, ``tenant_in_flight``, ``fair_share`` or ``deadline``."""

    reason: str

    def __new__(cls, reason: str, message: str) -> Refusal:
        refusal = super().__new__(cls, message)
        refusal.reason = reason
        return refusal


@dataclass
class TenantLoad:
    """A tenant's recent checks, decayed (scaled: see ``Admission.scale``)."""

    asked: float = 0.0
    admitted: float = 0.0


def fair_level(asked: list[float], capacity: float) -> float:
    """The max-min fair level: what each tenant may have when ``capacity`` is shared among tenants asking ``asked``
    (a tenant asking less than the level gets what it asks; the others the level). Infinite when all fit."""
    remaining = capacity
    waiting = len(asked)
    for want in sorted(asked):
        if want * waiting > remaining:
            return remaining / waiting
        remaining -= want
        waiting -= 1
    return math.inf


class Admission:
    """Counts checks in flight; ``enter`` says whether one more may start, ``leave`` ends one. Event-loop only (no
    locks): every call is made from the loop's thread. ``clock``: monotonic seconds (injected in tests).
    ``overload_busy``: the event loop's busy share from which the sidecar counts as overloaded (0: never, no fair
    share)."""

    def __init__(
        self,
        max_in_flight: int,
        tenant_share: float,
        clock: Callable[[], float] = time.monotonic,
        overload_busy: float = 0.0,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.max_per_tenant = max(1, math.floor(max_in_flight * tenant_share))
        self.in_flight = 0
        self.by_tenant: Counter[str] = Counter()
        self.clock = clock
        self.check_seconds = 0.0  # the average time of a check (0 until one finished)
        self.measured_at = 0.0  # when it last took a check's time
        self.overload_busy = overload_busy
        self.loop_busy = 0.0  # the average of the event loop's recent busy shares
        self.recent: dict[str, TenantLoad] = {}  # tenants active lately: their checks asked and admitted
        self.forgotten_at = clock()  # when idle tenants were last dropped from ``recent``
        self.scale_origin = clock()  # counts in ``recent`` are scaled by 2 ** ((now - this) / FAIR_HALF_LIFE_S)

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

    # --- the overload signal and the fair share ---------------------------------------------------------------------

    def note_loop_busy(self, busy: float) -> None:
        """Take one sample of the share of time the event loop had work (``watch_loop``)."""
        self.loop_busy += BUSY_WEIGHT * (min(1.0, max(0.0, busy)) - self.loop_busy)

    def overloaded(self) -> bool:
        """Whether the sidecar's CPU is behind: its event loop has had work nearly all the time lately."""
        return 0.0 < self.overload_busy <= self.loop_busy

    async def watch_loop(self, period_s: float = BUSY_PERIOD_S) -> None:
        """Sample the event loop's busy share for ever (a task of the sidecar, cancelled when it stops)."""
        loop = asyncio.get_running_loop()
        idle = LoopIdleMeter(loop)
        try:
            while idle.measuring:
                started, idle_before = loop.time(), idle.seconds
                await asyncio.sleep(period_s)
                took = loop.time() - started
                self.note_loop_busy(1.0 - (idle.seconds - idle_before) / took if took > 0 else 0.0)
        finally:
            idle.close()

    def scale(self) -> float:
        """The factor the counts of ``recent`` carry now: a check counted now adds this much, and a count divided by it
        is its decayed value. Rescales the counts when it grows too large."""
        exponent: float = (self.clock() - self.scale_origin) / FAIR_HALF_LIFE_S
        if exponent > MAX_SCALE_EXPONENT:
            factor = 0.5**exponent
            for load in self.recent.values():
                load.asked *= factor
                load.admitted *= factor
            self.scale_origin = self.clock()
            exponent = 0.0
        scale: float = 2.0**exponent
        return scale

    def forget_idle(self, scale: float) -> None:
        """Drop the tenants that asked for (almost) nothing lately."""
        floor = ACTIVE_MIN_CHECKS * scale
        for gone in [tenant for tenant, load in self.recent.items() if load.asked < floor]:
            del self.recent[gone]
        self.forgotten_at = self.clock()

    def fair_share_refusal(self, tenant_id: str, scale: float) -> Refusal | None:
        """Under overload, a check of a tenant that already took at least its fair share of the checks admitted
        lately is refused; the tenant's own check is counted as asked already."""
        if not self.overloaded():
            return None
        self.forget_idle(scale)
        if len(self.recent) < 2:
            return None  # no other tenant to make room for
        load = self.recent[tenant_id]
        asked = [other.asked for other in self.recent.values()]
        if load.asked * len(asked) <= sum(asked):
            # Asking no more than an equal part: never the one to give way (and while a long overload sheds the
            # others, the checks admitted shrink to this tenant's own, which must not make it over its share).
            return None
        admitted = sum(other.admitted for other in self.recent.values())
        level = fair_level(asked, admitted)
        mine = load.admitted
        if mine + scale <= level:  # one more check keeps it within its share
            return None
        return Refusal(
            "fair_share",
            f"this sidecar's CPU is behind (its event loop busy {self.loop_busy:.0%} of the time) and tenant "
            f"{tenant_id!r} took {mine / max(admitted, 1e-300):.0%} of the checks admitted lately, at least its fair "
            f"share of {min(1.0, level / max(admitted, 1e-300)):.0%} among the {len(self.recent)} tenants asking",
        )

    # --- admission --------------------------------------------------------------------------------------------------

    def refusal(self, tenant_id: str, remaining_s: float | None = None) -> Refusal | None:
        """Why a check of ``tenant_id`` with ``remaining_s`` left of its deadline (None: no deadline) may not start
        now, or None when it may. Counts the check as asked by its tenant."""
        if not self.bounded:
            return None
        scale = self.scale()
        if self.clock() - self.forgotten_at >= FAIR_HALF_LIFE_S:
            self.forget_idle(scale)  # so many tenants, each asking once, do not pile up
        self.recent.setdefault(tenant_id, TenantLoad()).asked += scale
        if self.in_flight >= self.max_in_flight:
            return Refusal("in_flight", f"this sidecar is at its bound of {self.max_in_flight} checks in flight")
        if self.by_tenant[tenant_id] >= self.max_per_tenant:
            return Refusal(
                "tenant_in_flight",
                f"tenant {tenant_id!r} has {self.max_per_tenant} checks in flight, its share of this sidecar's "
                f"{self.max_in_flight}",
            )
        if (unfair := self.fair_share_refusal(tenant_id, scale)) is not None:
            return unfair
        if remaining_s is not None and remaining_s < (expected := self.expected_seconds()):
            return Refusal(
                "deadline",
                f"a check takes this sidecar {expected * 1000:.0f} ms now, {max(0.0, remaining_s) * 1000:.0f} ms "
                "were left of this one's deadline",
            )
        self.recent[tenant_id].admitted += scale
        return None

    def enter(self, tenant_id: str, remaining_s: float | None = None) -> Refusal | None:
        """Start a check (None) or say why not (nothing is counted in flight then)."""
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
