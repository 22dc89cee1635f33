"""Notification settings (issue 14): refused at start naming the setting; fractions in basis points."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis as AsyncRedis

from budgetwarden.app._config import Settings
from budgetwarden.app._notify import deliverer_of
from budgetwarden.notify import Backoff, cloud_event, slack_text
from budgetwarden.store import NotificationEntry


def test_fractions_are_read_as_basis_points_each_once() -> None:
    assert Settings(notify_fractions="1.0, 0.8,0.8").notify_fractions_bp == (8000, 10000)
    assert Settings(notify_fractions="").notify_fractions_bp == ()


@pytest.mark.parametrize(
    ("settings", "named", "message"),
    [
        ({"notify_fractions": "0.8,1.5"}, "notify_fractions", "at most 1 (got 1.5)"),
        ({"notify_fractions": "0"}, "notify_fractions", "above 0"),
        ({"notify_fractions": "most"}, "notify_fractions", "(got most)"),
        ({"notify_webhook_urls": "ftp://example.com/x"}, "notify_webhook_urls", "http:// or https://"),
        ({"notify_slack_urls": "hooks.slack.com/services/T/B/secret"}, "notify_slack_urls", "http:// or https://"),
        ({"notify_webhook_urls": "https://example.com/hook"}, "notify_secret_file", "signed"),
        ({"notify_backoff_initial_ms": 5000, "notify_backoff_max_ms": 100}, "notify_backoff_max_ms", "at least"),
    ],
)
def test_notification_settings_that_cannot_work_are_refused_naming_the_setting(
    settings: dict[str, object], named: str, message: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(**settings)  # type: ignore[arg-type]
    assert named in str(refused.value)
    assert message in str(refused.value)
    # What the command line prints (the message, not the input): a Slack URL is itself a secret.
    assert "secret" not in refused.value.errors()[0]["msg"].replace("notify_secret_file", "")


def test_a_key_file_that_does_not_exist_is_refused_only_where_webhooks_need_it(tmp_path: Path) -> None:
    # A Deployment names the key's file from an optional Secret: without webhook URLs, its absence is no error.
    missing = tmp_path / "no-key-here"
    assert Settings(notify_secret_file=missing).notify_secret_file == missing
    with pytest.raises(ValidationError) as refused:
        Settings(notify_webhook_urls="https://example.com/hook", notify_secret_file=missing)
    assert "notify_secret_file" in str(refused.value)
    assert f"no such file: {missing}" in str(refused.value)


def test_no_url_no_deliverer_and_urls_make_one_target_each(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("k")
    client = AsyncRedis()  # never connected: the deliverer is only built
    assert deliverer_of(Settings(), client) is None
    settings = Settings(
        notify_webhook_urls="https://a.example/hook, https://b.example/hook",
        notify_slack_urls="https://hooks.slack.example/services/x",
        notify_secret_file=secret,
    )
    deliverer = deliverer_of(settings, client)
    assert deliverer is not None
    assert [(t.host, t.slack) for t in deliverer.targets] == [
        ("a.example", False),
        ("b.example", False),
        ("hooks.slack.example", True),
    ]


def test_backoff_doubles_up_to_its_ceiling() -> None:
    backoff = Backoff(0.5, 3.0, jitter=False)
    assert [backoff.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff.total(3) == 3.5
    jittered = Backoff(0.5, 3.0)
    assert all(0.25 <= jittered.delay(1) <= 0.5 for _ in range(100))


def entry(**fields: str) -> NotificationEntry:
    return NotificationEntry(stream="bw1:{acme}:notify", entry_id="1-0", tenant_id="acme", fields=fields)


def test_each_event_reads_as_one_slack_line_and_a_cloud_event() -> None:
    task = "100 150 0 -1 0 0"
    opened = entry(type="checkpoint.opened", time="0", checkpoint_id="ck1.x", task_id="t", task_type="g", task=task)
    approved = entry(**opened.fields | {"type": "checkpoint.approved", "added": "200", "added_usd": "0", "by": "al"})
    denied = entry(**opened.fields | {"type": "checkpoint.denied", "by": "bo"})
    crossed = entry(
        type="window.crossed", time="0", window="day:2026-11-30", unit="usd", fraction_bp="8000", limit="5000000",
        used="3000000", reserved="1000000",
    )  # fmt: skip
    texts = [slack_text(e) for e in (opened, approved, denied, crossed)]
    assert "budgetwarden approve ck1.x" in texts[0]
    assert "approved by al (+200 tokens)" in texts[1]
    assert "denied by bo" in texts[2]
    assert "reached 80% of its micro-USD limit (4000000 of 5000000)" in texts[3]
    assert all("\n" not in text for text in texts)
    event = cloud_event(crossed, "/bw")
    assert (event["subject"], event["id"], event["time"]) == ("acme", "acme/1-0", "1970-01-01T00:00:00.000Z")
    assert event["data"]["fraction"] == 0.8
    assert cloud_event(approved, "/bw")["data"]["task"]["limit_usd_micros"] is None
