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

This module is the reporter itself: the queue, the worker and delivery. Its parts live beside it: ``_wire`` (records
framed into requests, answers read into counts, the batch limits), ``_journal`` (the on-disk journal), ``_hooks``
(the exit and signal hooks) and ``_stats`` (``ReporterStats``).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import grpc
from google.protobuf import text_format

from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import _hooks
from budgetwarden_client._channels import ClientTls, open_channel
from budgetwarden_client._client import default_addr
from budgetwarden_client._journal import Journal, JournalClosedError
from budgetwarden_client._stats import ReporterStats
from budgetwarden_client._wire import (
    MAX_BATCH_BYTES,
    MAX_BATCH_RECORDS,
    MAX_RECORD_BYTES,
    Acks,
    BadResponseError,
    describe,
    encode_records,
    report_acks,
    split,
    stream_acks,
)

logger = logging.getLogger("budgetwarden_client.reporter")

OnFull = Literal["block", "drop", "spill"]

_STREAM_MESSAGES = 4  # with use_stream: up to this many batches, if already queued, share one ReportStream call
_SERVICE = "/budgetwarden.v1.BudgetService/"

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
        tls: ClientTls | None = None,
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

        self._journal = Journal(Path(journal_path)) if journal_path is not None else None
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

        self._channel = open_channel(
            self.addr,
            tls=tls or ClientTls.from_env(),
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
        _hooks.drain_at_exit(self._at_exit)

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
                self._enqueue(data)
                return True
        # Spilled outside the lock: the fsync must stall neither the worker nor other reporting threads.
        if self._journal is not None and self._spill([data]):
            return True
        self.stats.add(dropped=1)
        if late:
            logger.warning("budgetwarden reporter is closed: usage record dropped: %s", describe(data))
        return False

    def report_nowait(self, record: pb.UsageRecord) -> bool:
        """Queues a copy of ``record`` if that can be done at once, without waiting or writing the journal. True when
        the record is dealt with (queued; or too large ever to deliver, logged and counted in ``stats.rejected``);
        False, having done nothing, when the queue is full or the reporter is closing: then ``report()`` it where
        waiting is harmless (``AsyncBudget`` does, in a thread), since it may wait for room (``"block"``) or write the
        journal (``"spill"``)."""
        data = self._prepare(record)
        if data is None:
            return True  # refused for good (counted in stats.rejected): report() would not take it either
        with self._lock:
            if self._closing or self._worker_done or len(self._queue) >= self.queue_size:
                return False
            self._enqueue(data)
            return True

    def _enqueue(self, data: bytes) -> None:
        """Called with the lock held and room in the queue."""
        if not self._queue:
            self._batch_started = time.monotonic()
        self._queue.append(data)
        self._queued_bytes += len(data)
        self._enqueued += 1
        if len(self._queue) in (1, self.batch_size) or self._queued_bytes >= MAX_BATCH_BYTES:
            self._wake.notify()

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
        if not isinstance(record, pb.UsageRecord):
            raise TypeError(f"report() takes a UsageRecord, not {type(record).__name__}")
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
            _hooks.forget_at_exit(self._at_exit)
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
        _hooks.install_signal_handlers(signals, drain=self._at_exit, can_drain_inline=self._can_drain_inline)

    def _can_drain_inline(self) -> bool:
        """Whether a signal handler may close here: not when the interrupted thread holds one of our locks."""
        locks = [self._lock] + ([self._journal.lock] if self._journal is not None else [])
        return self._closed or _hooks.locks_free(locks)

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
        except (OSError, JournalClosedError) as exc:
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
            logger.error("budgetwarden reporter: lost usage record: %s", describe(record))

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
                        describe(chunk[0]),
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
            except BadResponseError as error:
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

    def _send_unary(self, chunk: list[bytes]) -> Acks:
        future = self._report_call.future(encode_records(chunk), timeout=self.timeout)
        return report_acks(self._wait(future), len(chunk))

    def _send_stream(self, chunk: list[bytes]) -> Acks:
        messages = [encode_records(group) for group in split(chunk, self.batch_size)]
        future = self._stream_call.future(iter(messages), timeout=self.timeout)
        return stream_acks(self._wait(future), len(chunk))

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

    def _acknowledged(self, acks: Acks, count: int, *, replay: bool) -> None:
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
