"""The reporter's process hooks: drain at interpreter exit, and (on request) on SIGTERM / SIGINT before the signal
does what it did before, so a short-lived agent process does not take its last usage records with it."""

from __future__ import annotations

import atexit
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

SignalHandler = Callable[[int, FrameType | None], None]


def drain_at_exit(drain: Callable[[], None]) -> None:
    atexit.register(drain)


def forget_at_exit(drain: Callable[[], None]) -> None:
    """Undoes :func:`drain_at_exit` (equal bound methods unregister each other)."""
    atexit.unregister(drain)


def locks_free(locks: Iterable[threading.Lock]) -> bool:
    """Whether each lock can be taken now (and is released again): the worker holds them only briefly, a thread
    interrupted by a signal while holding one holds it forever."""
    for lock in locks:
        if not lock.acquire(timeout=1.0):
            return False
        lock.release()
    return True


def install_signal_handlers(
    signals: Iterable[int], *, drain: Callable[[], None], can_drain_inline: Callable[[], bool]
) -> None:
    """On each of ``signals``: ``drain()``, then do what the signal did before (the default: terminate; SIGINT:
    KeyboardInterrupt; or the handler installed before). Call it from the main thread."""
    for signum in signals:
        previous = signal.getsignal(signum)
        signal.signal(signum, _drain_then_redeliver(signum, previous, drain, can_drain_inline))


def _drain_then_redeliver(
    signum: int, previous: Any, drain: Callable[[], None], can_drain_inline: Callable[[], bool]
) -> SignalHandler:
    def redeliver(frame: FrameType | None) -> None:
        restored = previous if previous is not None else signal.SIG_DFL
        signal.signal(signum, restored)
        if callable(restored):
            restored(signum, frame)
        elif restored != signal.SIG_IGN:
            signal.raise_signal(signum)

    def handler(received: int, frame: FrameType | None) -> None:
        # A Python signal handler runs in the main thread between two bytecodes, possibly while that thread holds
        # one of the reporter's locks (inside report()); draining inline would then wait forever for a worker that
        # needs it. So drain inline only when the locks can be taken, else from a helper thread that re-delivers after.
        if can_drain_inline():
            drain()
            redeliver(frame)
            return

        def later() -> None:
            drain()
            # Raised again once drained: the main thread runs this handler, which now re-delivers at once (only the
            # main thread may restore a signal's handler).
            signal.raise_signal(signum)

        threading.Thread(target=later, name="budgetwarden-reporter-signal", daemon=True).start()

    return handler
