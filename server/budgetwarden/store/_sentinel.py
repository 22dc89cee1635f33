"""Redis behind Sentinel: ``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]``
(``rediss+sentinel`` for TLS to the master). The sentinels are asked where the master is before each new connection;
after a failover the old master's connections fail (or answer READONLY) and are replaced by connections to the
promoted replica."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379


class SentinelUrlError(ValueError):
    """A sentinel URL without hosts or a service name, or with a port or db that is not a number."""


@dataclass(frozen=True, kw_only=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    tls: bool
    username: str | None
    password: str | None


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelTarget:
    scheme, _, rest = url.partition("://")
    userinfo, at, hosts = rest.partition("/")[0].rpartition("@")
    if not at:
        userinfo, hosts = "", rest.partition("/")[0]
    sentinels: list[tuple[str, int]] = []
    for host in filter(None, hosts.split(",")):
        if host.startswith("["):  # [::1]:26379
            name, _, port = host[1:].partition("]")
            port = port.removeprefix(":")
        else:
            name, _, port = host.partition(":")
        port = port or str(DEFAULT_SENTINEL_PORT)
        if not port.isdigit() or not name:
            raise SentinelUrlError(f"sentinel {host!r} is not host:port")
        sentinels.append((name, int(port)))
    if not sentinels:
        raise SentinelUrlError("no sentinel host:port before the service name")
    path = urlsplit(f"x://h/{rest.partition('/')[2]}").path.strip("/").split("/")
    service = unquote(path[0]) if path and path[0] else ""
    if not service:
        raise SentinelUrlError("no service name: redis+sentinel://host:port/SERVICE[/db]")
    db = path[1] if len(path) > 1 else "0"
    if not db.isdigit():
        raise SentinelUrlError(f"db {db!r} is not a number")
    user, colon, password = userinfo.partition(":")
    return SentinelTarget(
        sentinels=tuple(sentinels),
        service=service,
        db=int(db),
        tls=scheme.lower() == "rediss+sentinel",
        username=unquote(user) or None,
        password=unquote(password) if colon else None,
    )


def _connection_options(target: SentinelTarget, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Options for the master's connections and for the sentinels' own: the sentinels get the timeouts and TLS but
    not the master's credentials (sentinels usually run without, and ACL users differ)."""
    master = {**options, "db": target.db}
    if target.username is not None:
        master.setdefault("username", target.username)
    if target.password is not None:
        master.setdefault("password", target.password)
    tls_keys = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
    timeouts = ("socket_timeout", "socket_connect_timeout")
    sentinel: dict[str, Any] = {key: options[key] for key in timeouts if key in options}
    if target.tls:
        master["ssl"] = True
        sentinel.update({"ssl": True, **{key: options[key] for key in tls_keys if key in options}})
    return master, sentinel


def async_sentinel_master(
    target: SentinelTarget, redis_class: type[redis.asyncio.Redis], options: dict[str, Any]
) -> redis.asyncio.Redis:
    master, sentinel_kwargs = _connection_options(target, options)
    sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels), sentinel_kwargs=sentinel_kwargs, **master
    )
    client: redis.asyncio.Redis = sentinel.master_for(target.service, redis_class=redis_class)
    return client


def sync_sentinel_master(target: SentinelTarget, options: dict[str, Any]) -> redis.Redis:
    master, sentinel_kwargs = _connection_options(target, options)
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels), sentinel_kwargs=sentinel_kwargs, **master
    )
    client: redis.Redis = sentinel.master_for(target.service)  # type: ignore[no-untyped-call]
    return client


async def close_sentinels(client: Any) -> None:
    """The sentinels' own connections, which closing the master's client leaves open."""
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()
