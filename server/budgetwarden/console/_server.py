"""Serving the console: uvicorn on the control plane's event loop, on its own listener, with TLS from the same files as
the admin listener (read again when they change)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Generator
from pathlib import Path
from typing import Any

import uvicorn

log = logging.getLogger("budgetwarden.console")

START_LIMIT_S = 30.0


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: the control plane owns SIGTERM and SIGINT and stops us."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def parse_address(address: str) -> tuple[str, int]:
    """host:port, [v6]:port; an OSError naming the setting (the command prints it in one line, as a bind error)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host or not 0 <= int(port) <= 65535:
        raise OSError(f"console_listen: {address!r} is not host:port")
    return host.strip("[]"), int(port)


def _bind(address: str) -> socket.socket:
    host, port = parse_address(address)
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError as exc:
        raise OSError(f"console_listen {address}: {exc.strerror or exc}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(where)
    except OSError as exc:
        sock.close()
        raise OSError(f"console_listen {address}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class ReloadingContext:
    """A server SSLContext whose certificate, key and client CA are read again when their files change: checked at
    each handshake (one stat per file); a changed pair that does not load is logged and the previous one serves on."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.files = (cert_file, key_file, client_ca_file)
        self._stamps = self._stat()
        self.current = self._load()  # files that do not load at start are an error
        self.context = self._load()  # the listener's; each handshake moves to ``current``
        self.context.sni_callback = self._handshake
        self.loads = 1

    def _stat(self) -> tuple[tuple[int, int, int] | None, ...]:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self.files:
            try:
                stat = path.stat() if path is not None else None
            except OSError:
                stat = None
            stamps.append(None if stat is None else (stat.st_ino, stat.st_mtime_ns, stat.st_size))
        return tuple(stamps)

    def _load(self) -> ssl.SSLContext:
        cert_file, key_file, client_ca_file = self.files
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_file, key_file)
        if client_ca_file is not None:
            context.load_verify_locations(client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _handshake(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: Any) -> None:
        stamps = self._stat()
        if stamps != self._stamps:
            self._stamps = stamps
            try:
                self.current = self._load()
            except (OSError, ValueError) as exc:
                log.error("console TLS files rejected; the previous ones serve on", extra={"error": str(exc)})
            else:
                self.loads += 1
                log.info("console TLS files reloaded")
        connection.context = self.current


class ConsoleServer:
    """The console's listener. ``start`` returns once it accepts connections; ``stop`` lets requests in flight end."""

    def __init__(self, app: Any, address: str, tls: ReloadingContext | None, *, grace_s: float) -> None:
        self.address = address
        self.tls = tls
        self.config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,  # the control plane's logging
            access_log=False,  # a request line carries no secret, but the audit trail is the record of actions
            timeout_graceful_shutdown=max(1, int(grace_s)),
            ssl_context_factory=None if tls is None else (lambda _config, _default: tls.context),
        )
        self.server = _Server(self.config)
        self.port = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    async def start(self) -> None:
        sock = _bind(self.address)
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]), name="console")
        async with asyncio.timeout(START_LIMIT_S):
            while not self.server.started:
                if self._task.done():
                    self._task.result()  # its exception
                    raise OSError(f"console_listen {self.address}: the console stopped while starting")
                await asyncio.sleep(0.01)
        log.info("console serving", extra={"listen": self.address, "port": self.port, "tls": self.tls is not None})

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
