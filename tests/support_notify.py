"""Helpers for the notification tests: a webhook receiver on a loopback port, and a deliverer polled until idle."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from budgetwarden.notify import Deliverer

from support import free_port

WAIT_S = 60  # a bound on waiting for a condition, never a speed limit


class Receiver:
    """A webhook receiver on a loopback port: records each request (path, headers, body) and answers ``status``.
    With ``gate`` cleared, a request waits in the handler until it is set (a receiver that hangs)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.entered = 0  # requests that reached the handler, answered or not
        self.status = 200
        self.gate = threading.Event()
        self.gate.set()
        self.changed = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver.changed:
                    receiver.entered += 1
                    receiver.changed.notify_all()
                assert receiver.gate.wait(WAIT_S), "the test never released the receiver"
                with receiver.changed:
                    receiver.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    receiver.changed.notify_all()
                self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.gate.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def wait_for(self, condition: Callable[[Receiver], bool]) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: condition(self), WAIT_S), "the receiver never saw it"

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for path, _, body in self.requests if path == "/hook"]


async def deliver_all(deliverer: Deliverer) -> None:
    """Poll until nothing new is taken, waiting for each round's deliveries."""
    for _ in range(50):
        taken = await deliverer.poll()
        await deliverer.idle()
        if not taken:
            return
    raise AssertionError("the deliverer keeps taking events")
