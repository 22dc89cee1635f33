"""A background usage reporter: ``report()`` returns at once and a worker thread delivers records in batches.

Why it looks the way it does: an agent must not wait on the sidecar after each step, and usage must be neither lost
nor counted twice.

- Every record gets an idempotency key when it is queued, so sending it again after a failure (the server may have
  applied it before the answer was lost) is ``DUPLICATE`` on the server, never a second charge.
- A batch leaves the queue only once the server acknowledged it; transient failures are retried with jittered
  exponential backoff. A batch the server refuses as invalid is split until the bad record(s) are found, so one poison
  record never blocks the rest.
- What cannot be delivered by the close deadline is written to an fsynced journal file (when one is configured) that
  the next reporter on the same path replays; otherwise it is counted as lost and logged, record by record.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import json
import logging
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal

import grpc
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client._client import default_addr

logger = logging.getLogger("budgetwarden_client.reporter")

OnFull = Literal["block", "drop", "spill"]

MAX_BATCH_RECORDS = 1000
"""The server's limit of records per request (and per stream message)."""
MAX_BATCH_BYTES = 1 << 20
"""Bytes of records per request: far below gRPC's default 4 MiB receive limit, which would otherwise turn a batch of
records with many labels into a RESOURCE_EXHAUSTED that no retry can fix."""
MAX_RECORD_BYTES = 256 << 10
"""A record larger than this can never be delivered (the server's field limits make real ones a few KiB at most); it
is refused by ``report()`` instead of blocking the queue."""

_STREAM_MESSAGES = 4  # with use_stream: up to this many batches, if already queued, share one ReportStream call
_READ_CHUNK = 4 << 20
_SERVICE = "/budgetwarden.v1.BudgetService/"
# ReportRequest and ReportStreamRequest both hold ``repeated UsageRecord records = 1``: field 1, length-delimited.
_RECORDS_TAG = b"\x0a"

_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,  # not by us: a call we cancel ends the worker before its status is read
    }
)
# Refusals no retry can change: invalid records, and (ALREADY_EXISTS) a record whose idempotency key another record
# used. The server applies nothing of a refused call, so the batch is split until the refused record is alone.
_BAD_INPUT = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ALREADY_EXISTS})
# How gRPC's transport words the INTERNAL errors it makes up itself (a reset stream, a broken HTTP/2 connection), as
# opposed to an INTERNAL the server's code answered.
_TRANSPORT_MARKERS = ("rst_stream", "stream removed", "goaway", "http2", "http/2", "transport", "socket", "connection")


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


class _StoppedError(Exception):
    """The close deadline passed: the worker stops where it is."""


class _UnsentError(Exception):
    """Records that could not be delivered; ``stopped`` when because of the close deadline, else ``max_retries``."""

    def __init__(self, records: list[bytes], *, stopped: bool) -> None:
        super().__init__(f"{len(records)} records unsent")
        self.records = records
        self.stopped = stopped


class _BadInputError(Exception):
    def __init__(self, details: str) -> None:
        super().__init__(details)
        self.details = details


class _BadResponseError(Exception):
    """The server answered, but not for the records sent: treated as a failure, so the records are sent again."""


class _JournalClosedError(Exception):
    pass


@dataclass(frozen=True)
class _Acks:
    applied: int
    duplicate: int
    unreserved: int


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_records(records: Iterable[bytes]) -> bytes:
    """A serialized ReportRequest / ReportStreamRequest. Records are queued already serialized (that is also what the
    journal holds), so a batch, and every resend of it, is a join rather than a parse and a re-serialization."""
    return b"".join(_RECORDS_TAG + _varint(len(record)) + record for record in records)


def _describe(data: bytes) -> str:
    try:
        return text_format.MessageToString(pb.UsageRecord.FromString(data), as_one_line=True)
    except DecodeError:
        return f"<undecodable record, {len(data)} bytes>"


def _split(records: list[bytes], max_records: int) -> Iterator[list[bytes]]:
    """Consecutive groups of at most ``max_records`` records and ``MAX_BATCH_BYTES`` bytes."""
    group: list[bytes] = []
    size = 0
    for record in records:
        if group and (len(group) >= max_records or size + len(record) > MAX_BATCH_BYTES):
            yield group
            group, size = [], 0
        group.append(record)
        size += len(record) + 8
    if group:
        yield group


def _lock_exclusive(fd: int) -> None:
    """Takes the journal's advisory lock, so two reporters never append to and truncate the same file."""
    if sys.platform != "win32":
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _fsync_dir(path: Path) -> None:
    """Makes a file's creation, rename or removal durable (its directory entry lives in the directory)."""
    if sys.platform == "win32":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Journal:
    """An append-only file of usage records, one JSON line each: ``{"record": "<base64 serialized UsageRecord>"}``.

    Appends are written and fsynced before they return, so a spilled record survives a crash. The file is truncated only
    after the server acknowledged every record in it; a crash in between replays records the server already has, which
    their idempotency keys make harmless.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self._fd: int | None = self._open()
        self._offset = 0  # everything before this offset is acknowledged
        self.initial_records = self._repair_and_count()

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                _lock_exclusive(fd)
            except OSError as exc:
                os.close(fd)
                raise RuntimeError(f"journal {self.path} is in use by another reporter") from exc
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                if created:
                    _fsync_dir(self.path.parent)
                return fd
            os.close(fd)  # its previous owner removed or replaced it between our open and our lock: open it again

    def _repair_and_count(self) -> int:
        """Counts the complete lines and cuts a torn last line (a write a crash interrupted, so never acknowledged to
        its caller), which the next append would otherwise run into."""
        fd = self._require()
        size = os.fstat(fd).st_size
        count = end = position = 0
        while position < size:
            chunk = os.pread(fd, min(_READ_CHUNK, size - position), position)
            if not chunk:
                break
            count += chunk.count(b"\n")
            last = chunk.rfind(b"\n")
            if last >= 0:
                end = position + last + 1
            position += len(chunk)
        if end < size:
            logger.warning("journal %s: cutting a torn last line of %d bytes", self.path, size - end)
            os.ftruncate(fd, end)
            os.fsync(fd)
        return count

    def _require(self) -> int:
        if self._fd is None:
            raise _JournalClosedError(str(self.path))
        return self._fd

    def append(self, records: list[bytes]) -> None:
        data = b"".join(
            json.dumps({"record": base64.b64encode(record).decode("ascii")}, separators=(",", ":")).encode() + b"\n"
            for record in records
        )
        with self.lock:
            fd = self._require()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)

    def read(self, max_records: int) -> tuple[list[bytes], int, int]:
        """The next records after the acknowledged offset: (records, the offset after them, unreadable lines)."""
        with self.lock:
            fd = self._require()
            chunk = os.pread(fd, _READ_CHUNK, self._offset)
        records: list[bytes] = []
        bad = 0
        position = 0
        size = 0
        while len(records) < max_records and size < MAX_BATCH_BYTES:
            newline = chunk.find(b"\n", position)
            if newline < 0:
                break
            line = chunk[position:newline]
            position = newline + 1
            try:
                record = base64.b64decode(json.loads(line)["record"], validate=True)
                pb.UsageRecord.FromString(record)
            except (ValueError, KeyError, TypeError, binascii.Error, DecodeError):
                bad += 1
                logger.error("journal %s: skipping an unreadable line: %r", self.path, line[:200])
                continue
            records.append(record)
            size += len(record)
        if position == 0 and len(chunk) == _READ_CHUNK:  # a line longer than any record can be: skip its start
            bad += 1
            position = len(chunk)
            logger.error("journal %s: skipping %d bytes without a line end", self.path, position)
        return records, self._offset + position, bad

    def ack(self, offset: int) -> None:
        with self.lock:
            fd = self._require()
            self._offset = offset
            if offset >= os.fstat(fd).st_size:
                os.ftruncate(fd, 0)
                os.fsync(fd)
                self._offset = 0

    def close(self) -> None:
        """Removes the file when everything in it was acknowledged; otherwise drops the acknowledged head, so the next
        reporter does not send it again."""
        with self.lock:
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
            try:
                size = os.fstat(fd).st_size
                if size == 0:
                    self.path.unlink(missing_ok=True)
                    _fsync_dir(self.path.parent)
                elif self._offset > 0:
                    rest = self.path.with_name(self.path.name + ".tmp")
                    with open(rest, "wb") as out:
                        position = self._offset
                        while position < size:
                            chunk = os.pread(fd, _READ_CHUNK, position)
                            if not chunk:
                                break
                            out.write(chunk)
                            position += len(chunk)
                        out.flush()
                        os.fsync(out.fileno())
                    os.replace(rest, self.path)
                    _fsync_dir(self.path.parent)
            except OSError:
                logger.exception("journal %s: could not tidy up on close (its records are kept)", self.path)
            finally:
                os.close(fd)


class BackgroundReporter:
    """Reports usage records to the sidecar from a worker thread, in batches, retrying until acknowledged.

    ``report(record)`` queues a record and returns at once. The worker sends a batch when ``batch_size`` records are
    queued or ``flush_interval`` seconds after the first of them, over the unary ``Report`` RPC (``use_stream=True``:
    ``ReportStream``, falling back to ``Report`` for a sidecar that does not have it).

    When the queue (``queue_size`` records) is full, ``on_full`` decides: ``"block"`` waits for room (up to
    ``block_timeout`` seconds; None: as long as it takes), ``"drop"`` drops the record, ``"spill"`` appends it to the
    journal at ``journal_path`` (required then). ``report()`` returns False for a record it dropped.

    With ``journal_path`` set, records still unsent at the close deadline (or after ``max_retries`` failed attempts) are
    written there, and a reporter started on that path sends them first. Retries back off exponentially with full
    jitter between ``backoff_base`` and ``backoff_max`` seconds and go on until the close deadline unless
    ``max_retries`` is set. ``timeout`` is the deadline of one RPC. ``drain_timeout`` is how long the ``atexit`` hook
    and the signal handlers of :meth:`install_signal_handlers` give ``close()``.
    """

    def __init__(
        self,
        addr: str | None = None,
        *,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        queue_size: int = 10_000,
        on_full: OnFull = "block",
        block_timeout: float | None = None,
        journal_path: str | os.PathLike[str] | None = None,
        max_retries: int | None = None,
        backoff_base: float = 0.05,
        backoff_max: float = 5.0,
        use_stream: bool = False,
        timeout: float = 10.0,
        drain_timeout: float = 10.0,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH_RECORDS:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_RECORDS} (the server's limit)")
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if on_full not in ("block", "drop", "spill"):
            raise ValueError(f"on_full must be 'block', 'drop' or 'spill', not {on_full!r}")
        if on_full == "spill" and journal_path is None:
            raise ValueError("on_full='spill' needs a journal_path")
        if flush_interval < 0 or (block_timeout is not None and block_timeout < 0):
            raise ValueError("flush_interval and block_timeout must not be negative")
        if max_retries is not None and max_retries < 0:
            raise ValueError("max_retries must not be negative")
        if not 0 < backoff_base <= backoff_max:
            raise ValueError("backoff_base must be positive and at most backoff_max")
        if timeout <= 0 or drain_timeout < 0:
            raise ValueError("timeout must be positive and drain_timeout not negative")
        self.addr = addr or default_addr()
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.queue_size = queue_size
        self.on_full: OnFull = on_full
        self.block_timeout = block_timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.drain_timeout = drain_timeout
        self.stats = ReporterStats()

        self._journal = _Journal(Path(journal_path)) if journal_path is not None else None
        self.journal_path = self._journal.path if self._journal is not None else None
        # One lock guards the queue and the progress counters; it is never held across I/O.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the worker waits for records, flushes, close, call completion
        self._room = threading.Condition(self._lock)  # report() waits for room ("block")
        self._progress = threading.Condition(self._lock)  # flush() waits for acknowledgements
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._batch_started = 0.0  # when the oldest queued record was queued (monotonic)
        self._enqueued = 0  # records ever queued
        self._completed = 0  # records ever taken off the queue and dealt with (FIFO, so a prefix of _enqueued)
        self._journal_written = self._journal.initial_records if self._journal is not None else 0
        self._journal_done = 0
        self._journal_resume_at = 0.0
        self._flushing = 0
        self._closing = False
        self._deadline: float | None = None
        self._worker_done = False
        self._closed = False
        self._close_lock = threading.RLock()  # re-entrant: a signal handler may close while close() runs
        self._failures = 0

        self._channel = grpc.insecure_channel(
            self.addr,
            options=[
                # gRPC's own reconnect backoff reaches 120 s by default, which would keep a sidecar that came back
                # unused for minutes; keep it within ours.
                ("grpc.initial_reconnect_backoff_ms", max(10, int(backoff_base * 1000))),
                ("grpc.max_reconnect_backoff_ms", max(10, int(backoff_max * 1000))),
            ],
        )
        self._report_call = self._channel.unary_unary(
            _SERVICE + "Report", request_serializer=bytes, response_deserializer=pb.ReportResponse.FromString
        )
        self._stream_call = self._channel.stream_unary(
            _SERVICE + "ReportStream",
            request_serializer=bytes,
            response_deserializer=pb.ReportStreamResponse.FromString,
        )
        self._stream = use_stream
        self._worker = threading.Thread(target=self._run, name="budgetwarden-reporter", daemon=True)
        self._worker.start()
        atexit.register(self._at_exit)

    # -- the caller's side --------------------------------------------------------------------------------------------

    @property
    def streaming(self) -> bool:
        """Whether batches go over ReportStream: ``use_stream`` was asked for and the sidecar has the RPC."""
        return self._stream

    def report(self, record: pb.UsageRecord) -> bool:
        """Queues a copy of ``record`` for delivery; False when it was dropped (see ``on_full``; also after close).

        A record without an ``idempotency_key`` is given a fresh one here, and one without a ``timestamp`` the current
        time, so every resend of it is the same record to the server.
        """
        if not isinstance(record, pb.UsageRecord):
            raise TypeError(f"report() takes a UsageRecord, not {type(record).__name__}")
        data = self._prepare(record)
        if data is None:
            return False
        with self._lock:
            late = self._closing or self._worker_done
            if not late and len(self._queue) >= self.queue_size:
                if self.on_full == "drop":
                    self.stats.add(dropped=1)
                    return False
                if self.on_full == "block":
                    if not self._wait_for_room():
                        self.stats.add(dropped=1)
                        return False
                    late = self._closing or self._worker_done
            if not late and len(self._queue) < self.queue_size:
                if not self._queue:
                    self._batch_started = time.monotonic()
                self._queue.append(data)
                self._queued_bytes += len(data)
                self._enqueued += 1
                if len(self._queue) in (1, self.batch_size) or self._queued_bytes >= MAX_BATCH_BYTES:
                    self._wake.notify()
                return True
        # Spilled outside the lock: the fsync must stall neither the worker nor other reporting threads.
        if self._journal is not None and self._spill([data]):
            return True
        self.stats.add(dropped=1)
        if late:
            logger.warning("budgetwarden reporter is closed: usage record dropped: %s", _describe(data))
        return False

    def _wait_for_room(self) -> bool:
        """Called with the lock held. True when there is room (or the reporter is closing), False on timeout."""
        deadline = None if self.block_timeout is None else time.monotonic() + self.block_timeout
        while len(self._queue) >= self.queue_size and not (self._closing or self._worker_done):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._room.wait(remaining)
        return True

    def _prepare(self, record: pb.UsageRecord) -> bytes | None:
        copy = pb.UsageRecord()
        copy.CopyFrom(record)
        if not copy.idempotency_key:
            copy.idempotency_key = str(uuid.uuid4())
        if not copy.HasField("timestamp"):
            copy.timestamp.GetCurrentTime()
        data = copy.SerializeToString()
        if len(data) > MAX_RECORD_BYTES:
            self.stats.add(rejected=1)
            logger.error(
                "usage record of %d bytes is larger than %d and can never be delivered; dropped: %s",
                len(data),
                MAX_RECORD_BYTES,
                text_format.MessageToString(copy, as_one_line=True)[:2000],
            )
            return None
        return data

    def flush(self, timeout: float | None = None) -> bool:
        """Sends what is queued now, without waiting for ``flush_interval``, and waits until every record reported
        before this call is dealt with (acknowledged, or refused as invalid and counted in ``stats.rejected``) and the
        journal is empty. False if that did not happen within ``timeout`` seconds (None: wait as long as it takes), or
        if records were lost meanwhile (``max_retries`` exhausted with no journal)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        lost = self.stats.lost
        with self._lock:
            target = self._enqueued
            self._flushing += 1
            self._wake.notify()
            try:
                while self._completed < target or self._journal_done < self._journal_written:
                    if self._worker_done:
                        return False
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._progress.wait(remaining)
                return self.stats.lost == lost
            finally:
                self._flushing -= 1

    def close(self, timeout: float | None = 10.0) -> None:
        """Delivers what is queued (and journaled) for up to ``timeout`` seconds (None: until it is all delivered),
        then stops the worker. Records still unsent then go to the journal if there is one, else they are counted in
        ``stats.lost`` and logged. Later ``report()`` calls spill to the journal or are dropped. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            with self._lock:
                if not self._closing:
                    self._closing = True
                    self._deadline = None if timeout is None else time.monotonic() + timeout
                self._wake.notify_all()
                self._room.notify_all()
                self._progress.notify_all()
            atexit.unregister(self._at_exit)
            if self._worker is not threading.current_thread():
                # The worker gives up at the deadline on its own (cancelling a call in flight); the extra time is for
                # writing its remainder to the journal.
                join = None if self._deadline is None else max(0.0, self._deadline - time.monotonic()) + 30.0
                self._worker.join(join)
                if self._worker.is_alive():
                    logger.error("budgetwarden reporter: the worker did not stop in time")
            self._channel.close()
            if self._journal is not None:
                self._journal.close()
            self._closed = True

    def _at_exit(self) -> None:
        self.close(self.drain_timeout)

    def install_signal_handlers(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """For short-lived agent processes: on each of ``signals``, drain (``close(drain_timeout)``), then do what the
        signal did before (the default: terminate; SIGINT: KeyboardInterrupt; or the handler installed before).
        Call it from the main thread."""
        for signum in signals:
            previous = signal.getsignal(signum)
            signal.signal(signum, self._signal_handler(signum, previous))

    def _signal_handler(self, signum: int, previous: Any) -> Callable[[int, FrameType | None], None]:
        def redeliver(frame: FrameType | None) -> None:
            restored = previous if previous is not None else signal.SIG_DFL
            signal.signal(signum, restored)
            if callable(restored):
                restored(signum, frame)
            elif restored != signal.SIG_IGN:
                signal.raise_signal(signum)

        def handler(received: int, frame: FrameType | None) -> None:
            # A Python signal handler runs in the main thread between two bytecodes, possibly while that thread holds
            # one of our locks (inside report()); draining inline would then wait forever for a worker that needs it.
            # So drain inline only when the locks can be taken, else from a helper thread that re-delivers after.
            if self._closed or self._locks_free():
                self.close(self.drain_timeout)
                redeliver(frame)
                return

            def later() -> None:
                self.close(self.drain_timeout)
                # Raised again once closed: the main thread runs this handler, which now re-delivers at once (only
                # the main thread may restore a signal's handler).
                signal.raise_signal(signum)

            threading.Thread(target=later, name="budgetwarden-reporter-signal", daemon=True).start()

        return handler

    def _locks_free(self) -> bool:
        locks = [self._lock] + ([self._journal.lock] if self._journal is not None else [])
        for lock in locks:
            if not lock.acquire(timeout=1.0):  # the worker holds them only briefly; the interrupted thread forever
                return False
            lock.release()
        return True

    def __enter__(self) -> BackgroundReporter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(self.drain_timeout)

    # -- the worker ---------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        journal_turn = True  # alternate with the queue, so neither starves the other
        try:
            while True:
                work = self._next_work(journal_turn)
                if work is None:
                    return
                if work == "journal":
                    self._send_journal_batch()
                    journal_turn = False
                else:
                    assert isinstance(work, list)
                    self._send_queue_batch(work)
                    journal_turn = True
        except _StoppedError:
            pass
        except BaseException:
            logger.exception("budgetwarden reporter: the worker failed")
        finally:
            self._exit_worker()

    def _next_work(self, journal_turn: bool) -> list[bytes] | Literal["journal"] | None:
        with self._lock:
            while True:
                now = time.monotonic()
                urgent = self._flushing > 0 or self._closing
                journal_due = self._journal_written > self._journal_done and now >= self._journal_resume_at
                queue_due = bool(self._queue) and (
                    urgent
                    or len(self._queue) >= self.batch_size
                    or self._queued_bytes >= MAX_BATCH_BYTES
                    or now >= self._batch_started + self.flush_interval
                )
                if journal_due and (journal_turn or not queue_due):
                    return "journal"
                if queue_due:
                    return self._take()
                if self._closing and not self._queue:
                    return None  # the journal is empty, or gave up retrying (max_retries): it keeps its records
                waits = []
                if self._queue:
                    waits.append(self._batch_started + self.flush_interval - now)
                if self._journal_written > self._journal_done:
                    waits.append(self._journal_resume_at - now)
                self._wake.wait(max(0.0, min(waits)) if waits else None)

    def _take(self) -> list[bytes]:
        """Called with the lock held: the next batch off the queue (with use_stream, a few batches if queued)."""
        limit = self.batch_size * (_STREAM_MESSAGES if self._stream else 1)
        byte_limit = MAX_BATCH_BYTES * (_STREAM_MESSAGES if self._stream else 1)
        batch: list[bytes] = []
        size = 0
        while self._queue and len(batch) < limit and (not batch or size + len(self._queue[0]) <= byte_limit):
            record = self._queue.popleft()
            batch.append(record)
            size += len(record)
        self._queued_bytes -= size
        self._room.notify(len(batch))
        return batch

    def _send_queue_batch(self, batch: list[bytes]) -> None:
        try:
            self._deliver(batch, replay=False)
        except _UnsentError as unsent:
            reason = "not delivered by the close deadline" if unsent.stopped else "max_retries exhausted"
            self._dispose(unsent.records, reason)
            if unsent.stopped:
                raise _StoppedError from None
        except Exception:
            logger.exception("budgetwarden reporter: unexpected error delivering a batch")
            self._dispose(batch, "unexpected error")
        finally:
            with self._lock:
                self._completed += len(batch)
                self._progress.notify_all()

    def _send_journal_batch(self) -> None:
        assert self._journal is not None
        records, end, bad = self._journal.read(self.batch_size)
        if bad:
            self.stats.add(lost=bad)
        if records:
            try:
                self._deliver(records, replay=True)
            except _UnsentError as unsent:
                if unsent.stopped:
                    raise _StoppedError from None
                with self._lock:  # the records stay in the journal; the queue gets its turns meanwhile
                    self._journal_resume_at = time.monotonic() + self.backoff_max
                return
        self._journal.ack(end)
        with self._lock:
            if not records and not bad:
                # Nothing readable although the counts say otherwise (an append that failed half-way): re-align, or
                # the worker would spin.
                self._journal_done = self._journal_written
            else:
                self._journal_done += len(records) + bad
            self._progress.notify_all()

    def _exit_worker(self) -> None:
        with self._lock:
            leftover = list(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
        if leftover:
            self._dispose(leftover, "not delivered by the close deadline")
        with self._lock:
            self._completed += len(leftover)
            self._worker_done = True
            self._progress.notify_all()
            self._room.notify_all()

    def _spill(self, records: list[bytes]) -> bool:
        assert self._journal is not None
        try:
            self._journal.append(records)
        except (OSError, _JournalClosedError) as exc:
            logger.error("budgetwarden reporter: could not write %d records to the journal: %s", len(records), exc)
            return False
        with self._lock:
            self._journal_written += len(records)
            self._wake.notify()
        self.stats.add(spilled=len(records))
        return True

    def _dispose(self, records: list[bytes], reason: str) -> None:
        """Records the worker cannot deliver now: into the journal if there is one, else counted lost and logged."""
        if not records or (self._journal is not None and self._spill(records)):
            return
        self.stats.add(lost=len(records))
        logger.error("budgetwarden reporter: %d usage records lost (%s); each follows", len(records), reason)
        for record in records:
            logger.error("budgetwarden reporter: lost usage record: %s", _describe(record))

    # -- delivery -----------------------------------------------------------------------------------------------------

    def _deliver(self, records: list[bytes], *, replay: bool) -> None:
        """Sends ``records`` until each is acknowledged or refused. A refused batch (INVALID_ARGUMENT: the server
        validates all records first and applies none) is halved until the bad records are alone, so a poison record
        costs about 2·log2(batch) extra calls and the others still go through. Raises _UnsentError with what is left."""
        pending: list[list[bytes]] = [records]
        first = True
        while pending:
            chunk = pending.pop()
            try:
                self._send(chunk, replay=replay, stream=self._stream and first)
            except _BadInputError as bad:
                if len(chunk) == 1:
                    self.stats.add(rejected=1)
                    logger.error(
                        "budgetwarden refused a usage record, dropping it: %s; record: %s",
                        bad.details,
                        _describe(chunk[0]),
                    )
                else:
                    half = len(chunk) // 2
                    pending += [chunk[half:], chunk[:half]]
            except _UnsentError as unsent:
                rest = [record for group in reversed(pending) for record in group]
                raise _UnsentError(unsent.records + rest, stopped=unsent.stopped) from None
            first = False

    def _send(self, chunk: list[bytes], *, replay: bool, stream: bool) -> None:
        attempt = 0
        while True:
            if attempt:
                self.stats.add(retried=1)
            self.stats.add(sent=len(chunk))
            try:
                acks = self._send_stream(chunk) if stream else self._send_unary(chunk)
            except _StoppedError:
                raise _UnsentError(chunk, stopped=True) from None
            except grpc.RpcError as error:
                code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
                details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
                if code in _BAD_INPUT:
                    raise _BadInputError(details) from None
                if stream and code == grpc.StatusCode.UNIMPLEMENTED:
                    logger.warning("the sidecar at %s has no ReportStream; reporting with Report instead", self.addr)
                    self._stream = stream = False
                    attempt += 1
                    continue
                self._failed(code, details)
            except _BadResponseError as error:
                self._failed(grpc.StatusCode.UNKNOWN, str(error))
            else:
                self._acknowledged(acks, len(chunk), replay=replay)
                return
            attempt += 1
            if self.max_retries is not None and attempt > self.max_retries:
                raise _UnsentError(chunk, stopped=False)
            try:
                self._backoff(attempt)
            except _StoppedError:
                raise _UnsentError(chunk, stopped=True) from None

    def _send_unary(self, chunk: list[bytes]) -> _Acks:
        future = self._report_call.future(_encode_records(chunk), timeout=self.timeout)
        response: pb.ReportResponse = self._wait(future)
        if len(response.results) != len(chunk):
            raise _BadResponseError(f"Report answered {len(response.results)} results for {len(chunk)} records")
        statuses = [result.status for result in response.results]
        return _Acks(
            applied=statuses.count(pb.REPORT_STATUS_APPLIED),
            duplicate=statuses.count(pb.REPORT_STATUS_DUPLICATE),
            unreserved=statuses.count(pb.REPORT_STATUS_UNRESERVED),
        )

    def _send_stream(self, chunk: list[bytes]) -> _Acks:
        messages = [_encode_records(group) for group in _split(chunk, self.batch_size)]
        future = self._stream_call.future(iter(messages), timeout=self.timeout)
        response: pb.ReportStreamResponse = self._wait(future)
        if response.records != len(chunk):
            raise _BadResponseError(f"ReportStream acknowledged {response.records} records of {len(chunk)} sent")
        return _Acks(applied=response.applied, duplicate=response.duplicate, unreserved=response.unreserved)

    def _wait(self, future: Any) -> Any:
        """The call's result; cancels it and raises _StoppedError when the close deadline passes first."""
        future.add_done_callback(self._call_done)
        with self._lock:
            while not future.done():
                remaining = None if self._deadline is None else self._deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._wake.wait(remaining)
            else:
                return future.result()
        future.cancel()  # outside the lock: its completion callback takes the lock
        raise _StoppedError

    def _call_done(self, _future: Any) -> None:
        with self._lock:
            self._wake.notify_all()

    def _backoff(self, attempt: int) -> None:
        """Full jitter: a random wait up to the exponential bound, so many reporters do not retry in step."""
        until = time.monotonic() + random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** min(attempt, 40)))
        with self._lock:
            while True:
                now = time.monotonic()
                if self._deadline is not None and now >= self._deadline:
                    raise _StoppedError
                if now >= until:
                    return
                self._wake.wait(min(until, self._deadline if self._deadline is not None else until) - now)

    def _failed(self, code: grpc.StatusCode, details: str) -> None:
        self._failures += 1
        transient = code in _TRANSIENT or (
            code == grpc.StatusCode.INTERNAL and any(marker in details.lower() for marker in _TRANSPORT_MARKERS)
        )
        if not transient:
            # Not the records' fault (the server validates them first): a deployment problem or a server bug. The
            # records are kept and retried like the rest, but loudly.
            logger.error("budgetwarden Report failed (%s: %s); retrying, records are kept", code.name, details)
        elif self._failures == 1:
            logger.warning("budgetwarden Report failed (%s: %s); retrying with backoff", code.name, details)
        else:
            logger.debug("budgetwarden Report failed again (%s: %s)", code.name, details)

    def _acknowledged(self, acks: _Acks, count: int, *, replay: bool) -> None:
        if self._failures:
            logger.info("budgetwarden Report delivered after %d failed attempts", self._failures)
            self._failures = 0
        self.stats.add(
            acknowledged=count,
            applied=acks.applied,
            duplicate=acks.duplicate,
            unreserved=acks.unreserved,
            replayed=count if replay else 0,
        )
