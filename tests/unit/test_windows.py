from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from budgetwarden.domain._model import Window
from budgetwarden.domain._windows import SpanCache, span_at

UTC = ZoneInfo("UTC")


def ms(text: str, tz: str = "UTC") -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp() * 1000)


@pytest.mark.parametrize(
    ("window", "now", "label", "start", "end"),
    [
        (Window.MINUTE, "2026-11-27T08:34:59.999", "2026-11-27T08:34+0000", "2026-11-27T08:34", "2026-11-27T08:35"),
        (Window.HOUR, "2026-11-27T08:00:00", "2026-11-27T08+0000", "2026-11-27T08:00", "2026-11-27T09:00"),
        (Window.DAY, "2026-11-27T23:59:59.999", "2026-11-27", "2026-11-27T00:00", "2026-11-28T00:00"),
        (Window.DAY, "2026-11-28T00:00:00", "2026-11-28", "2026-11-28T00:00", "2026-11-29T00:00"),
        (Window.MONTH, "2026-12-31T23:59:59", "2026-12", "2026-12-01T00:00", "2027-01-01T00:00"),
        (Window.MONTH, "2028-02-29T12:00:00", "2028-02", "2028-02-01T00:00", "2028-03-01T00:00"),
    ],
)
def test_spans_in_utc(window: Window, now: str, label: str, start: str, end: str) -> None:
    span = span_at(window, UTC, ms(now))
    assert (span.label, span.start_ms, span.end_ms) == (label, ms(start), ms(end))


def test_day_follows_the_tenant_time_zone() -> None:
    # 23:30 UTC on the 27th is already the 28th in Berlin (UTC+1 in November).
    span = span_at(Window.DAY, ZoneInfo("Europe/Berlin"), ms("2026-11-27T23:30"))
    assert span.label == "2026-11-28"
    assert span.start_ms == ms("2026-11-28T00:00", "Europe/Berlin")
    assert span.end_ms - span.start_ms == 24 * 3_600_000


def test_days_across_daylight_saving_changes_are_23_and_25_hours() -> None:
    ny = ZoneInfo("America/New_York")
    spring = span_at(Window.DAY, ny, ms("2026-03-08T12:00", "America/New_York"))
    autumn = span_at(Window.DAY, ny, ms("2026-11-01T12:00", "America/New_York"))
    assert spring.end_ms - spring.start_ms == 23 * 3_600_000
    assert autumn.end_ms - autumn.start_ms == 25 * 3_600_000


def test_repeated_hour_at_fall_back_gets_two_windows() -> None:
    ny = ZoneInfo("America/New_York")
    first = span_at(Window.HOUR, ny, ms("2026-11-01T05:30"))  # 01:30 EDT
    second = span_at(Window.HOUR, ny, ms("2026-11-01T06:30"))  # 01:30 EST
    assert first.label != second.label
    assert first.end_ms == second.start_ms


def test_hour_in_a_half_hour_zone_starts_at_local_hour() -> None:
    span = span_at(Window.HOUR, ZoneInfo("Asia/Kolkata"), ms("2026-11-27T08:40"))  # 14:10 IST
    assert span.start_ms == ms("2026-11-27T08:30")
    assert span.label == "2026-11-27T14+0530"


def test_month_rolls_over_in_the_tenant_zone() -> None:
    tokyo = ZoneInfo("Asia/Tokyo")
    span = span_at(Window.MONTH, tokyo, ms("2026-11-30T15:00"))  # 00:00 on Dec 1st in Tokyo
    assert span.label == "2026-12"
    assert span.start_ms == ms("2026-11-30T15:00")


def test_every_instant_lies_inside_its_window() -> None:
    zones = [ZoneInfo(name) for name in ("UTC", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu")]
    start = ms("2026-03-01T00:00")
    for tz in zones:
        for step in range(0, 400 * 86_400_000, 7 * 3_600_000 + 13 * 60_000 + 17_000):
            now = start + step
            for window in Window:
                span = span_at(window, tz, now)
                assert span.start_ms <= now < span.end_ms, (tz, window, now)


def test_span_cache_renews_when_the_window_ends() -> None:
    cache = SpanCache()
    first = cache.get(Window.MINUTE, "UTC", ms("2026-11-27T08:34:10"))
    assert cache.get(Window.MINUTE, "UTC", ms("2026-11-27T08:34:59")) is first
    later = cache.get(Window.MINUTE, "UTC", ms("2026-11-27T08:35:00"))
    assert later.start_ms == first.end_ms
    # An injected clock may go back: the cache answers for the time asked, not the last one.
    assert cache.get(Window.MINUTE, "UTC", ms("2026-11-27T08:34:10")) == first
