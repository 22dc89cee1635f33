"""The counters of a :class:`~budgetwarden_client.BackgroundReporter`."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass
class ReporterStats:
    """Counters of a :class:`BackgroundReporter`, in records unless said otherwise. ``snapshot()`` copies them
    consistently; the attributes of the live object may be read at any time."""

    sent: int = 0
    """Records put on the wire; a record sent again after a failure counts again."""
    acknowledged: int = 0
    """Records the server acknowledged: ``applied + duplicate + unreserved``."""
    applied: int = 0
    duplicate: int = 0
    unreserved: int = 0
    retried: int = 0
    """RPC attempts that repeated a failed one (attempts, not records)."""
    dropped: int = 0
    """``report()`` returned False: the queue was full ("drop", or "block" past ``block_timeout``) or the reporter was
    closed."""
    rejected: int = 0
    """Records the server refused as invalid (or too large to send): dropped and logged."""
    spilled: int = 0
    """Records written to the journal."""
    replayed: int = 0
    """Records read back from the journal and acknowledged."""
    lost: int = 0
    """Records given up with no journal to keep them (close deadline, ``max_retries``) or unreadable in the journal:
    each is logged."""
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, count in counts.items():
                setattr(self, name, getattr(self, name) + count)

    def snapshot(self) -> ReporterStats:
        with self._lock:
            return ReporterStats(**{f.name: getattr(self, f.name) for f in fields(self) if f.init})
