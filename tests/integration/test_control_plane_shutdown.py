"""The control plane stops when asked, even when its store watch's PING consumed the cancellation (redis-py can finish
a call cancelled in flight and return its answer): its shutdown waits for the watch without a bound."""

from __future__ import annotations

import asyncio
from pathlib import Path

from budgetwarden.limiter import wall_clock_ms

from support import AnswersWhenCancelled
from support_console import start_control_plane, two_tenants


def test_a_store_watch_whose_ping_consumed_the_cancellation_still_stops(redis_url: str, tmp_path: Path) -> None:
    running = start_control_plane(
        redis_url, None, two_tenants(tmp_path), wall_clock_ms, console_listen=None, store_ping_interval_seconds=0.01
    )
    plane = running.plane
    ping = AnswersWhenCancelled(True)

    async def swap_the_ping_and_wait_for_one() -> None:
        plane._store_answers = ping  # type: ignore[method-assign]
        await ping.entered.wait()

    asyncio.run_coroutine_threadsafe(swap_the_ping_and_wait_for_one(), running._loop).result(60)
    running.stop()  # before the fix: the watch slept on, the stop waited for it, and this gave up after 60 s
