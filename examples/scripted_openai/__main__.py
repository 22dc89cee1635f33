"""Serve scripted models by hand: ``PYTHONPATH=examples python -m scripted_openai --model gpt-4o --port 8000``.

Each model answers every request with a fixed sentence naming itself and the last user text, so a client (the SDK,
curl) can be tried against it offline. Tests and the demo script their own replies in process instead.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from typing import Any

from .script import RecordedRequest, Reply
from .server import ScriptedOpenAI


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return str(message["content"])
    return ""


def echo(request: RecordedRequest) -> Reply:
    return Reply(text=f"{request.model} (scripted) heard: {_last_user_text(request.messages)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripted_openai", description=__doc__)
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: a free one); default 8000")
    parser.add_argument("--model", action="append", help="a model to serve (repeatable); default gpt-4o, gpt-4o-mini")
    args = parser.parse_args(argv)
    server = ScriptedOpenAI({name: echo for name in args.model or ["gpt-4o", "gpt-4o-mini"]}, port=args.port)
    with server:
        print(f"serving {', '.join(server.models)} at {server.base_url} (Ctrl-C or SIGTERM stops)", flush=True)
        stopping = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopping.set())
        with contextlib.suppress(KeyboardInterrupt):
            stopping.wait()


if __name__ == "__main__":
    main()
