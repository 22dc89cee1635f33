"""Stopping always ends: a step of the shutdown that hangs (a task that swallows its cancellation, a server whose calls
never finish) is logged with where it hangs and left behind, instead of holding the process past SIGTERM."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from budgetwarden.app import _sidecar

from support import AnswersWhenCancelled, RunningSidecar

OVERRAN = "shutdown step overran; going on without it"


async def swallows_every_cancellation() -> None:
    never = asyncio.Event()  # nothing sets it: the task waits on a condition that never comes
    while True:
        try:
            await never.wait()
        except asyncio.CancelledError:  # as a buggy library might
            continue


def test_a_shutdown_step_that_hangs_is_logged_and_left_behind(
    start_sidecar: Callable[..., RunningSidecar], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_sidecar, "STOP_STEP_LIMIT_S", 0.2)
    running = start_sidecar()
    sidecar = running.sidecar
    assert sidecar is not None

    async def plant_a_stubborn_store_watch() -> None:
        assert sidecar._store_watch is not None, "the sidecar runs a store watch"
        sidecar._store_watch.cancel()
        sidecar._store_watch = asyncio.create_task(swallows_every_cancellation())

    running.run(plant_a_stubborn_store_watch())
    with caplog.at_level(logging.INFO, logger="budgetwarden.server"):
        running.stop()  # before: waited for the store watch forever (the helper gives up after 30 s)

    overran = [r for r in caplog.records if r.getMessage() == OVERRAN]
    assert [r.__dict__["step"] for r in overran] == ["store watch"]
    assert "swallows_every_cancellation" in overran[0].__dict__["at"]
    assert "stopped" in [r.getMessage() for r in caplog.records], "the rest of the shutdown ran"


def test_a_store_watch_whose_ping_consumed_the_cancellation_still_stops(
    start_sidecar: Callable[..., RunningSidecar], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # redis-py can finish a PING cancelled in flight and return its answer (seen with a stalled Valkey coming back:
    # 5 of 30 tries in a script): the cancellation is spent, and the watch went back to sleep until the step's limit.
    monkeypatch.setattr(_sidecar, "STOP_STEP_LIMIT_S", 60.0)  # the bug held the shutdown this long; the fix, not at all
    running = start_sidecar(store_ping_interval_seconds=0.01)
    sidecar = running.sidecar
    assert sidecar is not None
    ping = AnswersWhenCancelled(True)

    async def swap_the_ping_and_wait_for_one() -> None:
        sidecar._store_answers = ping  # type: ignore[method-assign]
        await ping.entered.wait()

    running.run(swap_the_ping_and_wait_for_one())
    with caplog.at_level(logging.INFO, logger="budgetwarden.server"):
        running.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert OVERRAN not in messages
    assert "stopped" in messages


def test_a_clean_shutdown_logs_no_overrun(
    start_sidecar: Callable[..., RunningSidecar], caplog: pytest.LogCaptureFixture
) -> None:
    running = start_sidecar()
    with caplog.at_level(logging.INFO, logger="budgetwarden.server"):
        running.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert OVERRAN not in messages
    assert "stopped" in messages
