"""A background loop's guard against a cancellation that a Redis call consumed."""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Raise CancelledError if the running task has been asked to stop.

    redis-py can finish a call cancelled in flight and return its result (seen with a PING cancelled just as a stalled
    server came back): the request stays counted on the task (``Task.cancelling``) but nothing raises it, so a loop
    that polls Redis and sleeps would run on, and whoever cancelled it to shut down would wait. Such loops call this
    after each round."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
