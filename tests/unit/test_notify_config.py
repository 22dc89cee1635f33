"""Notification settings (issue 14): refused at start naming the setting; fractions in basis points."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis as AsyncRedis

from budgetwarden.app._config import Settings
from budgetwarden.app._notify import deliverer_of
from budgetwarden.notify import Backoff


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
