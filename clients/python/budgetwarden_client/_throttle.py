"""Client-side adaptive throttling (Google SRE book, "Handling Overload"): a client that sees most of its checks refused
for overload stops sending most of them, and answers them itself, at no cost to the sidecar.

A refusal is not free for the sidecar: gRPC's per-call work in Python costs about half a decided check, so a tenant
that keeps sending what will be refused eats the CPU its neighbours need. Only the client can make a refusal cost
nothing, by not sending the call.

Over a trailing window the throttle counts ``requests`` (every check the step API was asked for, the ones it answered
itself included) and ``accepts`` (the ones the sidecar answered with anything but an overload refusal), and answers a
new check locally with the probability ``max(0, (requests - k * accepts) / (requests + 1))``. Nothing is throttled
until more than 1/k of the checks are refused; as the sidecar accepts again, accepts catch up and the probability falls
back to 0 (at the latest once the refusals leave the window).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from random import random as uniform

DEFAULT_K = 2.0
DEFAULT_WINDOW_S = 120.0
BUCKETS = 60  # the window is kept as this many slices: old counts leave it a slice at a time


@dataclass
class _Bucket:
    index: int
    requests: int = 0
    accepts: int = 0


class AdaptiveThrottle:
    """The throttle of one step API client (``Budget`` or ``AsyncBudget``): one sidecar, one tenant.

    ``k``: how many requests per accepted one are sent before any is throttled (2: throttling starts when more than
    half are refused; higher is more lenient); ``window``: the trailing seconds counted. ``clock`` (monotonic seconds)
    and ``random`` (a float in [0, 1)) are injectable for tests. Thread-safe: a ``Budget`` may be shared by threads."""

    def __init__(
        self,
        *,
        k: float = DEFAULT_K,
        window: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = uniform,
    ) -> None:
        if not k >= 1.0:
            raise ValueError(f"k must be at least 1, not {k!r}")
        if not window > 0:
            raise ValueError(f"window must be positive seconds, not {window!r}")
        self.k = k
        self.window = window
        self._clock = clock
        self._random = random
        self._slice = window / BUCKETS
        self._buckets: deque[_Bucket] = deque()
        self._requests = 0  # the sums over the buckets in the window
        self._accepts = 0
        self._lock = threading.Lock()
        self.throttled = 0
        """Checks answered locally, never sent (since the throttle was made)."""

    def admit(self) -> bool:
        """Whether to send a check now (True) or answer it locally (False, counted in ``throttled``). Either way it
        counts as a request; a sent one that is then not refused for overload must be reported with ``accepted()``."""
        with self._lock:
            bucket = self._current()
            send = self._random() >= self._probability()
            bucket.requests += 1
            self._requests += 1
            if not send:
                self.throttled += 1
            return send

    def accepted(self) -> None:
        """The sidecar answered a sent check (any decision, or any error but an overload refusal)."""
        with self._lock:
            self._current().accepts += 1
            self._accepts += 1

    def probability(self) -> float:
        """The probability that a check made now is answered locally."""
        with self._lock:
            self._current()
            return self._probability()

    def counts(self) -> tuple[int, int]:
        """``(requests, accepts)`` in the window now."""
        with self._lock:
            self._current()
            return self._requests, self._accepts

    def _probability(self) -> float:
        return max(0.0, (self._requests - self.k * self._accepts) / (self._requests + 1))

    def _current(self) -> _Bucket:
        """The bucket of now, once the ones that left the window are dropped (the lock held)."""
        index = int(self._clock() // self._slice)
        while self._buckets and self._buckets[0].index <= index - BUCKETS:
            gone = self._buckets.popleft()
            self._requests -= gone.requests
            self._accepts -= gone.accepts
        if not self._buckets or self._buckets[-1].index < index:
            self._buckets.append(_Bucket(index))
        return self._buckets[-1]

    def __repr__(self) -> str:
        return f"AdaptiveThrottle(k={self.k}, window={self.window}, throttled={self.throttled})"
