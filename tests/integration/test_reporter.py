"""The background usage reporter of the Python client, against real sidecars and a real Redis-compatible server.

Ground truth is what the tests reported; the server's task counters (read with GetBudget) must equal it exactly, so a
lost record or a record counted twice fails. Sidecars that are "down" are addresses nothing listens on yet.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from budgetwarden.app._config import Settings
from budgetwarden_client import BackgroundReporter, BudgetClient, pb

from support import TEST_RPC_TIMEOUT_S, RunningSidecar, free_port

TENANT = "acme"


def usage(task: str, step: str, tokens: int, **fields: Any) -> pb.UsageRecord:
    values: dict[str, Any] = {"output_tokens": tokens // 3, **fields}
    return pb.UsageRecord(tenant_id=TENANT, task_id=task, step_id=step, input_tokens=tokens, **values)


def charged(record: pb.UsageRecord) -> int:
    return record.input_tokens + record.output_tokens


class Truth:
    """What was reported, per task; ``records`` builds and remembers them."""

    def __init__(self) -> None:
        self.by_task: dict[str, int] = {}

    def records(self, count: int, *, tasks: int = 1, prefix: str = "t", per_step: int = 1) -> list[pb.UsageRecord]:
        """``per_step`` > 1: that many records (say, model calls) per step, each to be counted."""
        out = []
        for i in range(count):
            task = f"{prefix}{i % tasks}"
            record = usage(task, f"s{i // per_step}", 10 + i % 97)
            self.by_task[task] = self.by_task.get(task, 0) + charged(record)
            out.append(record)
        return out

    @property
    def total(self) -> int:
        return sum(self.by_task.values())


def used(addr: str, tasks: Iterator[str] | list[str] | dict[str, int]) -> dict[str, int]:
    """Each task's used tokens as the server has them."""
    with BudgetClient(addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        out = {}
        for task in tasks:
            scopes = {scope.name: scope for scope in client.get_budget(tenant_id=TENANT, task_id=task).scopes}
            out[task] = scopes["task"].used_tokens
        return out


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def journal_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.fixture
def down_addr() -> str:
    """An address no sidecar listens on (yet)."""
    return f"127.0.0.1:{free_port()}"


FAST_RETRY: dict[str, Any] = {"backoff_base": 0.01, "backoff_max": 0.2, "timeout": 5.0}


def test_batches_arrive_exactly_once_and_stats_add_up(sidecar: RunningSidecar) -> None:
    truth = Truth()
    records = truth.records(2000, tasks=4)
    checked = records[:40]  # these steps hold a reservation, so their records are APPLIED; the rest UNRESERVED
    with BudgetClient(sidecar.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        for record in checked:
            answer = client.check(
                tenant_id=TENANT, task_id=record.task_id, step_id=record.step_id, estimated_input_tokens=500
            )
            assert answer.decision == pb.DECISION_ALLOW
    with BackgroundReporter(sidecar.addr) as reporter:
        assert all(reporter.report(record) for record in records)
        assert reporter.flush(timeout=30)
        stats = reporter.stats.snapshot()
    assert used(sidecar.addr, truth.by_task) == truth.by_task
    with BudgetClient(sidecar.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        budget = {scope.name: scope for scope in client.get_budget(tenant_id=TENANT, task_id="t0").scopes}
    assert budget["task"].reserved_tokens == 0  # every reservation was replaced by its record
    assert budget["tenant.day"].used_tokens == truth.total
    assert (stats.acknowledged, stats.applied, stats.unreserved, stats.duplicate) == (2000, 40, 1960, 0)
    assert (stats.sent, stats.retried) == (2000, 0)
    assert (stats.dropped, stats.rejected, stats.lost, stats.spilled, stats.replayed) == (0, 0, 0, 0, 0)


def test_a_partial_batch_goes_out_on_the_timer(sidecar: RunningSidecar) -> None:
    truth = Truth()
    reporter = BackgroundReporter(sidecar.addr, batch_size=500, flush_interval=0.05)
    try:
        for record in truth.records(3):
            assert reporter.report(record)
        # No flush(): only the time trigger can send a batch of 3 when batches are of 500.
        wait_until(lambda: reporter.stats.acknowledged == 3, "the timer to send the partial batch")
        assert used(sidecar.addr, truth.by_task) == truth.by_task
    finally:
        reporter.close()


def test_records_reported_before_the_sidecar_exists_arrive_once_it_is_up(
    start_sidecar: Callable[..., RunningSidecar], down_addr: str
) -> None:
    truth = Truth()
    with BackgroundReporter(down_addr, batch_size=100, flush_interval=0.01, **FAST_RETRY) as reporter:
        for record in truth.records(300, tasks=3):
            assert reporter.report(record)
        wait_until(lambda: reporter.stats.retried > 0, "failed attempts against the missing sidecar")
        assert reporter.stats.acknowledged == 0
        up = start_sidecar(listen=down_addr)
        assert reporter.flush(timeout=30)
        stats = reporter.stats.snapshot()
    assert used(up.addr, truth.by_task) == truth.by_task
    assert stats.acknowledged == 300 == stats.applied + stats.unreserved + stats.duplicate
    assert stats.retried > 0
    assert stats.sent > 300  # the failed attempts sent the same records again
    assert (stats.lost, stats.dropped, stats.rejected) == (0, 0, 0)


def test_a_sidecar_restart_mid_stream_neither_loses_nor_doubles(
    start_sidecar: Callable[..., RunningSidecar], redis_url: str, down_addr: str
) -> None:
    truth = Truth()
    records = truth.records(1000, tasks=5)
    settings: dict[str, Any] = {"listen": down_addr, "redis_url": redis_url, "log_format": "text"}
    first = RunningSidecar(Settings(**settings)).start()
    with BackgroundReporter(down_addr, batch_size=50, flush_interval=0.01, **FAST_RETRY) as reporter:
        stopper = threading.Thread(target=first.stop)
        try:
            for record in records[:600]:
                assert reporter.report(record)
                if record is records[400]:  # stop it while batches are in flight
                    stopper.start()
        finally:
            if not stopper.is_alive() and stopper.ident is None:
                first.stop()
            stopper.join(30)
        for record in records[600:]:  # reported while nothing listens: these at least must be retried
            assert reporter.report(record)
        wait_until(lambda: reporter.stats.retried > 0, "failed attempts while the sidecar is down")
        second = start_sidecar(listen=down_addr)
        assert reporter.flush(timeout=30)
        stats = reporter.stats.snapshot()
    assert used(second.addr, truth.by_task) == truth.by_task
    assert stats.acknowledged == 1000 == stats.applied + stats.unreserved + stats.duplicate
    assert stats.retried > 0
    assert (stats.lost, stats.dropped, stats.rejected) == (0, 0, 0)


def test_records_sent_again_with_their_keys_are_duplicates(sidecar: RunningSidecar) -> None:
    truth = Truth()
    records = truth.records(120, tasks=2)
    for i, record in enumerate(records):
        record.idempotency_key = f"k-{i}"
    with BackgroundReporter(sidecar.addr) as first:
        assert all(first.report(record) for record in records)
        assert first.flush(timeout=30)
    with BackgroundReporter(sidecar.addr) as again:  # as if the acknowledgement had been lost and the batch resent
        assert all(again.report(record) for record in records)
        assert again.flush(timeout=30)
        stats = again.stats.snapshot()
    assert (stats.acknowledged, stats.duplicate, stats.applied, stats.unreserved) == (120, 120, 0, 0)
    assert used(sidecar.addr, truth.by_task) == truth.by_task


def test_spilled_journal_is_replayed_by_the_next_reporter_and_a_second_replay_changes_nothing(
    start_sidecar: Callable[..., RunningSidecar], down_addr: str, tmp_path: Path
) -> None:
    truth = Truth()
    journal = tmp_path / "usage.journal"
    reporter = BackgroundReporter(
        down_addr, on_full="spill", journal_path=journal, queue_size=10, batch_size=10, **FAST_RETRY
    )
    # No idempotency keys, and three records per step: only the keys the reporter gives them keep them apart on the
    # server (a key-less record counts once per step), and those keys must survive the journal.
    for record in truth.records(200, tasks=4, per_step=3):
        assert reporter.report(record)
    spilled_while_full = reporter.stats.spilled
    assert spilled_while_full >= 180  # at most one batch in flight and a full queue stayed in memory
    assert journal_lines(journal) == spilled_while_full
    reporter.close(timeout=0.3)  # the sidecar is still down: the rest goes to the journal at the deadline
    stats = reporter.stats.snapshot()
    assert (stats.spilled, stats.lost, stats.acknowledged, stats.dropped) == (200, 0, 0, 0)
    assert journal_lines(journal) == 200
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    keys = {pb.UsageRecord.FromString(base64.b64decode(line["record"])).idempotency_key for line in lines}
    assert len(keys) == 200
    assert "" not in keys
    copy = tmp_path / "copy.journal"
    shutil.copy(journal, copy)

    up = start_sidecar(listen=down_addr)
    with BackgroundReporter(up.addr, journal_path=journal) as replaying:
        assert replaying.flush(timeout=30)
        replayed = replaying.stats.snapshot()
    assert (replayed.replayed, replayed.acknowledged, replayed.unreserved) == (200, 200, 200)
    assert not journal.exists()
    assert used(up.addr, truth.by_task) == truth.by_task

    # A crash between the acknowledgement and the truncation would replay the same lines again: all duplicates.
    with BackgroundReporter(up.addr, journal_path=copy) as again:
        assert again.flush(timeout=30)
        twice = again.stats.snapshot()
    assert (twice.replayed, twice.duplicate, twice.applied, twice.unreserved) == (200, 200, 0, 0)
    assert not copy.exists()
    assert used(up.addr, truth.by_task) == truth.by_task


def test_spill_journal_is_drained_by_the_running_reporter_when_the_sidecar_returns(
    start_sidecar: Callable[..., RunningSidecar], down_addr: str, tmp_path: Path
) -> None:
    truth = Truth()
    journal = tmp_path / "usage.journal"
    with BackgroundReporter(
        down_addr, on_full="spill", journal_path=journal, queue_size=10, batch_size=10, **FAST_RETRY
    ) as reporter:
        assert all(reporter.report(record) for record in truth.records(150, tasks=3))
        spilled = reporter.stats.spilled
        assert spilled >= 130
        assert journal_lines(journal) == spilled
        up = start_sidecar(listen=down_addr)
        assert reporter.flush(timeout=30)
        assert journal.stat().st_size == 0  # truncated once its records were acknowledged
        stats = reporter.stats.snapshot()
    assert not journal.exists()
    assert (stats.acknowledged, stats.replayed, stats.lost) == (150, spilled, 0)
    assert used(up.addr, truth.by_task) == truth.by_task


def test_drop_mode_drops_and_counts_when_the_queue_is_full(down_addr: str) -> None:
    truth = Truth()
    reporter = BackgroundReporter(down_addr, on_full="drop", queue_size=5, batch_size=5, **FAST_RETRY)
    results = [reporter.report(record) for record in truth.records(100)]
    accepted = sum(results)
    assert 5 <= accepted <= 10  # the queue, and at most one batch taken out of it by the worker
    assert reporter.stats.dropped == 100 - accepted
    reporter.close(timeout=0.2)
    assert reporter.stats.lost == accepted  # no journal: what could not be sent by the deadline is counted lost


def test_block_mode_waits_for_room(start_sidecar: Callable[..., RunningSidecar], down_addr: str) -> None:
    truth = Truth()
    timed = BackgroundReporter(down_addr, queue_size=2, batch_size=2, block_timeout=0.1, **FAST_RETRY)
    results = []
    for record in truth.records(20, prefix="gone"):
        results.append(timed.report(record))
        if not results[-1]:
            break
    assert results[-1] is False
    assert 2 <= len(results) - 1 <= 4  # the queue, and one batch in flight
    assert timed.stats.dropped == 1
    timed.close(timeout=0.1)

    reporter = BackgroundReporter(down_addr, queue_size=2, batch_size=2, **FAST_RETRY)  # block_timeout=None
    blocked_results: list[bool] = []
    records = truth.records(12, prefix="kept")
    producer = threading.Thread(target=lambda: blocked_results.extend(reporter.report(r) for r in records))
    producer.start()
    producer.join(0.5)
    assert producer.is_alive()  # 12 records do not fit 2 queued + 2 in flight: it waits (no timeout)
    up = start_sidecar(listen=down_addr)
    producer.join(30)
    assert not producer.is_alive()
    assert blocked_results == [True] * 12
    assert reporter.flush(timeout=30)
    reporter.close()
    assert (reporter.stats.acknowledged, reporter.stats.dropped, reporter.stats.lost) == (12, 0, 0)
    kept = {task: tokens for task, tokens in truth.by_task.items() if task.startswith("kept")}
    assert used(up.addr, kept) == kept


def test_max_retries_moves_a_batch_to_the_journal_or_counts_it_lost(
    start_sidecar: Callable[..., RunningSidecar], down_addr: str, tmp_path: Path
) -> None:
    truth = Truth()
    lossy = BackgroundReporter(down_addr, max_retries=2, batch_size=5, flush_interval=60, **FAST_RETRY)
    assert all(lossy.report(record) for record in truth.records(5, prefix="gone"))
    assert lossy.flush(timeout=20) is False  # dealt with, but by giving up
    # one batch of 5 (the size trigger): sent, retried twice, given up
    assert (lossy.stats.lost, lossy.stats.retried, lossy.stats.sent, lossy.stats.acknowledged) == (5, 2, 15, 0)
    lossy.close()

    journal = tmp_path / "usage.journal"
    with BackgroundReporter(
        down_addr, max_retries=1, batch_size=5, flush_interval=60, journal_path=journal, **FAST_RETRY
    ) as kept:
        records = truth.records(5, prefix="kept")
        assert all(kept.report(record) for record in records)
        wait_until(lambda: kept.stats.spilled == 5, "the batch to move to the journal after its retries")
        assert journal_lines(journal) == 5
        up = start_sidecar(listen=down_addr)
        assert kept.flush(timeout=30)  # the journal is retried after a pause, and now delivered
        stats = kept.stats.snapshot()
    assert (stats.replayed, stats.acknowledged, stats.lost) == (5, 5, 0)
    assert not journal.exists()
    kept_truth = {task: tokens for task, tokens in truth.by_task.items() if task.startswith("kept")}
    assert used(up.addr, kept_truth) == kept_truth


def test_close_drains_and_later_reports_are_dropped(sidecar: RunningSidecar) -> None:
    truth = Truth()
    reporter = BackgroundReporter(sidecar.addr, flush_interval=60)  # only close() can send these
    assert all(reporter.report(record) for record in truth.records(100, tasks=2))
    reporter.close()
    assert used(sidecar.addr, truth.by_task) == truth.by_task
    assert (reporter.stats.acknowledged, reporter.stats.lost) == (100, 0)
    assert reporter.report(usage("t0", "late", 5)) is False
    assert reporter.stats.dropped == 1
    assert used(sidecar.addr, truth.by_task) == truth.by_task


def test_stream_path_delivers_the_same(sidecar: RunningSidecar) -> None:
    """Needs the server's ReportStream; without it the reporter falls back to Report and ``streaming`` says so."""
    truth = Truth()
    with BackgroundReporter(sidecar.addr, use_stream=True, batch_size=200, flush_interval=0.02) as reporter:
        assert all(reporter.report(record) for record in truth.records(1500, tasks=3))
        assert reporter.flush(timeout=30)
        assert reporter.streaming, "the sidecar has no ReportStream (UNIMPLEMENTED): the reporter fell back to Report"
        stats = reporter.stats.snapshot()
    assert used(sidecar.addr, truth.by_task) == truth.by_task
    assert (stats.acknowledged, stats.unreserved, stats.applied, stats.duplicate) == (1500, 1500, 0, 0)
    assert (stats.sent, stats.retried, stats.rejected, stats.lost) == (1500, 0, 0, 0)


@pytest.mark.parametrize("use_stream", [False, True])
def test_invalid_records_are_isolated_and_rejected(
    sidecar: RunningSidecar, caplog: pytest.LogCaptureFixture, use_stream: bool
) -> None:
    truth = Truth()
    good = truth.records(60, tasks=2)
    bad = [
        usage("t0", "bad-cached", 100, cached_input_tokens=101),  # more cached input than input
        usage("t1", "bad-negative", 100, output_tokens=-5),
    ]
    batch = [*good[:17], bad[0], *good[17:45], bad[1], *good[45:]]
    caplog.set_level(logging.ERROR, logger="budgetwarden_client")
    with BackgroundReporter(sidecar.addr, batch_size=100, flush_interval=60, use_stream=use_stream) as reporter:
        assert all(reporter.report(record) for record in batch)
        assert reporter.flush(timeout=30)  # one batch of 62: refused as a whole, then split around the bad records
        assert reporter.streaming is use_stream
        stats = reporter.stats.snapshot()
    assert (stats.rejected, stats.acknowledged) == (2, 60)
    assert stats.applied + stats.unreserved + stats.duplicate == 60
    assert stats.lost == 0
    assert used(sidecar.addr, truth.by_task) == truth.by_task
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert 'step_id: "bad-cached"' in logged
    assert "cached_input_tokens" in logged
    assert 'step_id: "bad-negative"' in logged
