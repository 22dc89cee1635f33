"""A lean client for the hot script calls (check.lua's EVALSHA): one persistent connection to a single Redis, calls
pipelined on it and their replies matched in order (Redis answers in order), parsed by hiredis. redis-py's asyncio
client costs about five times as much CPU per call (docs/benchmarks.md, "The check's Redis call, by client").

The connection is opened and authenticated by redis-py itself (a ``Connection`` from the store client's own pool:
the same URL, credentials, password file, TLS, database and timeouts), then its transport is handed to the protocol
here. So only a plain single Redis qualifies (``lean_scripts_for`` says None for a Cluster or a Sentinel-managed
client; the sidecar does not use it with ``--durability`` either, whose confirmation must follow each call).

Semantics kept from redis-py: an error reply raises the exception redis-py's parser makes of it (ResponseError,
NoScriptError, ...); NOSCRIPT loads the script and runs it once more; a dropped connection fails every call waiting
on it with ConnectionError, and the next call connects again (after failed connects, not before a short, doubling
backoff, at most MAX_BACKOFF_S). A call whose caller gives up (its deadline) keeps its place: its reply is read and
dropped. ``socket_timeout`` is the backstop redis-py's is: a connection whose oldest call has waited longer is closed.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, ConnectionPool, SSLConnection, UnixDomainSocketConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

MIN_BACKOFF_S = 0.01
MAX_BACKOFF_S = 1.0

_CONNECTION_CLASSES = (Connection, SSLConnection, UnixDomainSocketConnection)


class _Pending:
    __slots__ = ("future", "sent_at")

    def __init__(self, future: asyncio.Future[Any], sent_at: float) -> None:
        self.future = future
        self.sent_at = sent_at


class _PipelinedProtocol(asyncio.Protocol):
    """Replies matched to calls first in, first out. A reply whose caller is gone (cancelled) is dropped."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        # The stream writer redis-py connected with is kept: it closes the transport when collected.
        self.writer = writer
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.reader = hiredis.Reader(protocolError=InvalidResponse, replyError=BaseParser.parse_error)
        self.pending: collections.deque[_Pending] = collections.deque()
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                future = self.pending.popleft().future
                if future.done():  # its caller gave up: the reply is dropped, the next one is the next call's
                    continue
                if isinstance(reply, Exception):  # an error reply, made by redis-py's parse_error
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except InvalidResponse as exc:  # the stream cannot be trusted past this
            self.abort(RedisConnectionError(f"lean Redis client: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(RedisConnectionError(f"lean Redis client: connection lost ({exc or 'closed by the server'})"))

    def send(self, packed: bytes, now: float) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        self.pending.append(_Pending(future, now))
        self.transport.write(packed)
        return future

    def oldest_sent_at(self) -> float | None:
        return self.pending[0].sent_at if self.pending else None

    def abort(self, error: Exception) -> None:
        self._fail_all(error)
        self.transport.abort()

    def _fail_all(self, error: Exception) -> None:
        self.lost = True
        while self.pending:
            future = self.pending.popleft().future
            if not future.done():
                future.set_exception(error)


class LeanScripts:
    """Runs scripts (redis-py ``AsyncScript`` objects, for their SHA and source) on one pipelined connection."""

    def __init__(self, pool: ConnectionPool, *, socket_timeout: float | None = None) -> None:
        self._pool = pool
        self._socket_timeout = socket_timeout
        self._protocol: _PipelinedProtocol | None = None
        self._connecting: asyncio.Task[_PipelinedProtocol] | None = None
        self._backoff_s = 0.0
        self._retry_at = 0.0
        self._closed = False

    async def run(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """EVALSHA the script; on NOSCRIPT, load it and run it once more (as redis-py's Script does)."""
        call = ("EVALSHA", script.sha, len(keys), *keys, *args)
        protocol = await self._connection()
        try:
            return await self._send(protocol, _pack(call))
        except NoScriptError:
            protocol = await self._connection()
            loaded = self._send(protocol, _pack(("SCRIPT", "LOAD", script.script)))
            again = self._send(protocol, _pack(call))
            try:
                await loaded
            except BaseException:
                if again.done() and not again.cancelled():
                    again.exception()  # failed with it (a dropped connection): retrieved, not logged as lost
                again.cancel()
                raise
            return await again

    def _send(self, protocol: _PipelinedProtocol, packed: bytes) -> asyncio.Future[Any]:
        """The call's reply (raising an error reply as its exception); the call keeps its place if awaited no more."""
        return protocol.send(packed, asyncio.get_running_loop().time())

    async def _connection(self) -> _PipelinedProtocol:
        protocol = self._protocol
        if protocol is not None and not protocol.lost:
            if not self._stalled(protocol):
                return protocol
            protocol.abort(RedisTimeoutError("lean Redis client: no reply within the socket timeout"))
        if self._closed:
            raise RedisConnectionError("lean Redis client: closed")
        if self._connecting is None:
            loop = asyncio.get_running_loop()
            if loop.time() < self._retry_at:
                raise RedisConnectionError("lean Redis client: not connected (waiting to connect again)")
            self._connecting = loop.create_task(self._connect())
        # Shielded: a caller whose deadline passes leaves the connect to the others.
        return await asyncio.shield(self._connecting)

    def _stalled(self, protocol: _PipelinedProtocol) -> bool:
        oldest = protocol.oldest_sent_at()
        if self._socket_timeout is None or oldest is None:
            return False
        return asyncio.get_running_loop().time() - oldest > self._socket_timeout

    async def _connect(self) -> _PipelinedProtocol:
        loop = asyncio.get_running_loop()
        try:
            # redis-py connects: its connect timeout, TLS, AUTH (or the password file), SELECT, client name.
            connection: Connection = self._pool.make_connection()  # type: ignore[no-untyped-call]
            await connection.connect()  # type: ignore[no-untyped-call]
            writer = connection._writer
            assert writer is not None
            protocol = _PipelinedProtocol(writer)
            protocol.transport.set_protocol(protocol)
            # The transport is the protocol's now: redis-py's connection must not close it when collected.
            connection._writer = connection._reader = None
        except BaseException:
            self._backoff_s = min(MAX_BACKOFF_S, max(MIN_BACKOFF_S, self._backoff_s * 2))
            self._retry_at = loop.time() + self._backoff_s
            raise
        finally:
            self._connecting = None
        self._backoff_s = 0.0
        if self._closed:
            protocol.transport.close()
            raise RedisConnectionError("lean Redis client: closed")
        self._protocol = protocol
        return protocol

    async def aclose(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._protocol is not None:
            self._protocol.abort(RedisConnectionError("lean Redis client: closed"))
            self._protocol = None


def _pack(parts: tuple[Any, ...]) -> bytes:
    """A command in RESP, packed by hiredis (str as UTF-8, int and float as text, bytes as they are)."""
    packed: bytes = hiredis.pack_command(cast(Any, parts))
    return packed


def lean_scripts_for(client: Any, *, socket_timeout: float | None) -> LeanScripts | None:
    """A lean client for ``client``'s Redis, or None where it does not apply: a Cluster, a Sentinel-managed master,
    or a client redis-py connects in ways this one does not know (RESP3, another connection class)."""
    if not isinstance(client, Redis):
        return None
    pool = client.connection_pool
    if type(pool) is not ConnectionPool or pool.connection_class not in _CONNECTION_CLASSES:
        return None
    if str(pool.connection_kwargs.get("protocol") or 2) != "2":
        return None
    return LeanScripts(pool, socket_timeout=socket_timeout)
