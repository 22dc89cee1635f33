"""Calendar windows in a tenant's time zone. Pure arithmetic: a window is named by its start and ends on its own."""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from ._model import Window, WindowSpan

_UTC = ZoneInfo("UTC")


@lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def span_at(window: Window, tz: ZoneInfo, now_ms: int) -> WindowSpan:
    """The window of the given length that contains ``now_ms``, aligned to the calendar in ``tz``.

    Day and month windows follow the local calendar, so a day is 23 or 25 hours long across a DST change.
    Minute and hour windows are fixed-length runs of absolute time starting at a local minute or hour boundary.
    """
    local = datetime.fromtimestamp(now_ms / 1000, tz)
    if window is Window.MINUTE:
        start = local.replace(second=0, microsecond=0)
        end_ms = _ms(start) + 60_000
        label = start.strftime("%Y-%m-%dT%H:%M%z")
        return WindowSpan(window=window, label=label, start_ms=_ms(start), end_ms=end_ms)
    if window is Window.HOUR:
        start = local.replace(minute=0, second=0, microsecond=0)
        label = start.strftime("%Y-%m-%dT%H%z")
        return WindowSpan(window=window, label=label, start_ms=_ms(start), end_ms=_ms(start) + 3_600_000)
    if window is Window.DAY:
        start = datetime(local.year, local.month, local.day, tzinfo=tz)
        following = start.date() + timedelta(days=1)
        end = datetime(following.year, following.month, following.day, tzinfo=tz)
        return _clamped(window, start.strftime("%Y-%m-%d"), start, end, now_ms)
    start = datetime(local.year, local.month, 1, tzinfo=tz)
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    end = datetime(year, month, 1, tzinfo=tz)
    return _clamped(window, start.strftime("%Y-%m"), start, end, now_ms)


def _clamped(window: Window, label: str, start: datetime, end: datetime, now_ms: int) -> WindowSpan:
    # In the few zones whose clocks jump at midnight, local midnight may not exist; keep now inside the window.
    start_ms, end_ms = min(_ms(start), now_ms), max(_ms(end), now_ms + 1)
    return WindowSpan(window=window, label=label, start_ms=start_ms, end_ms=end_ms)


class SpanCache:
    """Remembers the current span per (zone, window) until it ends, so the check path rarely touches datetime."""

    __slots__ = ("_spans",)

    def __init__(self) -> None:
        self._spans: dict[tuple[str, Window], WindowSpan] = {}

    def get(self, window: Window, tz_name: str, now_ms: int) -> WindowSpan:
        key = (tz_name, window)
        span = self._spans.get(key)
        if span is None or not span.start_ms <= now_ms < span.end_ms:
            span = span_at(window, zone(tz_name), now_ms)
            self._spans[key] = span
        return span
