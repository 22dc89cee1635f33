"""``redis+sentinel://`` URLs: the sentinels, the service, the db, TLS and the master's credentials."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from budgetwarden.app import Settings
from budgetwarden.store import SentinelTarget, SentinelUrlError, parse_sentinel_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://s1:26379,s2:26380/budget/2",
            SentinelTarget(
                sentinels=(("s1", 26379), ("s2", 26380)),
                service="budget",
                db=2,
                tls=False,
                username=None,
                password=None,
            ),
        ),
        (
            "rediss+sentinel://bw:p%40ss@s1,[::1]:5000/budget",
            SentinelTarget(
                sentinels=(("s1", 26379), ("::1", 5000)),
                service="budget",
                db=0,
                tls=True,
                username="bw",
                password="p@ss",
            ),
        ),
    ],
)
def test_a_sentinel_url_names_its_sentinels_service_db_and_credentials(url: str, expected: SentinelTarget) -> None:
    assert parse_sentinel_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel:///budget", "no sentinel host:port"),
        ("redis+sentinel://s1:port/budget", "'s1:port' is not host:port"),
        ("redis+sentinel://s1:26379", "no service name"),
        ("redis+sentinel://s1:26379/budget/first", "db 'first' is not a number"),
    ],
)
def test_a_malformed_sentinel_url_says_what_is_missing(url: str, message: str) -> None:
    with pytest.raises(SentinelUrlError, match=message):
        parse_sentinel_url(url)


def test_a_sentinel_url_is_not_a_cluster() -> None:
    with pytest.raises(ValidationError, match="redis_cluster: a redis\\+sentinel:// URL names a master"):
        Settings(redis_url="redis+sentinel://s1:26379/budget", redis_cluster=True)
