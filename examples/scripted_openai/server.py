"""The scripted OpenAI-compatible server: Starlette routes served by uvicorn in a background thread."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import wire
from .script import RecordedRequest, Reply, Responder, answer

# A fixed creation time: the same script gives the same bytes on every run.
CREATED = 1_767_225_600  # 2026-01-01T00:00:00Z
STARTUP_TIMEOUT_SECONDS = 30.0


class ScriptError(Exception):
    """A known model was asked more often than its script answers for."""


class _BadRequestError(Exception):
    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class _Model:
    def __init__(self) -> None:
        self.queue: collections.deque[Reply] = collections.deque()
        self.responder: Responder | None = None


class ScriptedOpenAI:
    """An OpenAI-compatible HTTP server on 127.0.0.1 whose models answer from a script.

    ``models`` maps a model name to its replies (a sequence, served in order) or to a function deciding each reply
    from the request. A model answers from its queue first, then from its function; a known model with neither left
    answers 500. Unknown models get the API's 404. Every request to a known path is recorded (``requests``).

        with ScriptedOpenAI({"gpt-4o": [Reply(text="hi")]}) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="test")
    """

    def __init__(
        self,
        models: Mapping[str, Sequence[Reply] | Responder] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        created: int = CREATED,
    ) -> None:
        self._host = host
        self._requested_port = port  # 0: a free port
        self._created = created
        self._lock = threading.Lock()
        self._models: dict[str, _Model] = {}
        self._requests: list[RecordedRequest] = []
        self._ids = itertools.count(1)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        for name, script in (models or {}).items():
            if callable(script):
                self.respond_with(name, script)
            else:
                self.script(name, *script)
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat_completions, methods=["POST"]),
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/models", self._list_models, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_error},  # type: ignore[dict-item]
        )

    # Scripting

    def add_model(self, name: str) -> None:
        with self._lock:
            self._models.setdefault(name, _Model())

    def script(self, model: str, *replies: Reply) -> None:
        """Queue ``replies`` for ``model`` (registering it), answered one a request in order."""
        with self._lock:
            self._models.setdefault(model, _Model()).queue.extend(replies)

    def respond_with(self, model: str, responder: Responder) -> None:
        """Let ``responder`` decide ``model``'s replies once its queue is empty (registering it)."""
        with self._lock:
            self._models.setdefault(model, _Model()).responder = responder

    @property
    def models(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # Lifecycle

    @property
    def port(self) -> int:
        assert self._port is not None, "the server is not started"
        return self._port

    @property
    def base_url(self) -> str:
        """What an OpenAI SDK client takes as ``base_url``."""
        return f"http://{self._host}:{self.port}/v1"

    def start(self) -> ScriptedOpenAI:
        """Serve on 127.0.0.1 (a free port unless ``port`` was given) in a background thread; return once it accepts
        connections."""
        assert self._thread is None, "the server is already started"
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((self._host, self._requested_port))  # bound here, so the port is known before uvicorn starts
        self._port = listener.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [listener]}, name="scripted-openai", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                listener.close()
                raise RuntimeError("the scripted OpenAI server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread to end (open streams are closed)."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(STARTUP_TIMEOUT_SECONDS)
        if self._thread.is_alive():
            raise RuntimeError("the scripted OpenAI server did not stop")
        self._server = self._thread = None
        self._port = None

    def __enter__(self) -> ScriptedOpenAI:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # Routes

    async def _chat_completions(self, request: Request) -> Response:
        try:
            body = await _json_object(request)
            recorded = _chat_request(body)
        except _BadRequestError as error:
            return _bad_request(error)
        reply = self._reply_for(recorded)
        if isinstance(reply, Response):
            return reply
        served = self._serve(recorded, reply, responses=False)
        if not recorded.stream:
            return JSONResponse(wire.chat_completion(served))
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        chunks = (json.dumps(chunk) for chunk in wire.chat_chunks(served, include_usage=include_usage))
        return _event_stream(itertools.chain((f"data: {c}\n\n" for c in chunks), ["data: [DONE]\n\n"]))

    async def _responses(self, request: Request) -> Response:
        try:
            recorded = _responses_request(await _json_object(request))
        except _BadRequestError as error:
            return _bad_request(error)
        reply = self._reply_for(recorded)
        if isinstance(reply, Response):
            return reply
        served = self._serve(recorded, reply, responses=True)
        if not recorded.stream:
            return JSONResponse(wire.response_object(served))
        events = wire.response_events(served)
        return _event_stream(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)

    async def _list_models(self, request: Request) -> Response:
        owned = {"object": "model", "created": self._created, "owned_by": "scripted"}
        data = [{"id": name, **owned} for name in self.models]
        return JSONResponse({"object": "list", "data": data})

    async def _http_error(self, request: Request, error: HTTPException) -> Response:
        # Unknown paths and methods answer in the API's error shape too.
        message = f"Invalid URL ({request.method} {request.url.path})"
        return JSONResponse(wire.error_body(message, type_="invalid_request_error"), status_code=error.status_code)

    def _reply_for(self, recorded: RecordedRequest) -> Reply | Response:
        with self._lock:
            model = self._models.get(recorded.model)
            if model is None:
                message = f"The model `{recorded.model}` does not exist or you do not have access to it."
                body = wire.error_body(message, type_="invalid_request_error", param="model", code="model_not_found")
                return JSONResponse(body, status_code=404)
            self._requests.append(recorded)
            if model.queue:
                return model.queue.popleft()
            responder = model.responder
        if responder is None:
            message = f"the script of model `{recorded.model}` has no reply left"
            return JSONResponse(wire.error_body(message, type_="server_error"), status_code=500)
        return responder(recorded)

    def _serve(self, recorded: RecordedRequest, reply: Reply, *, responses: bool) -> wire.Served:
        with self._lock:
            number = next(self._ids)
            call_numbers = [next(self._ids) for _ in reply.tool_calls]
        call_ids = tuple(call.id or f"call_{n}" for call, n in zip(reply.tool_calls, call_numbers, strict=True))
        prefix = "resp_" if responses else "chatcmpl-"  # as the API spells its ids
        item_ids = (*(f"fc_{n}" for n in call_numbers), f"msg_{number}")
        served_answer = answer(recorded, reply, wire.prompt_messages_of(recorded))
        return wire.Served(
            id=f"{prefix}{number}",
            created=self._created,
            request=recorded,
            answer=served_answer,
            call_ids=call_ids,
            item_ids=item_ids,
        )


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _BadRequestError(f"We could not parse the JSON body of your request: {error}", None) from error
    if not isinstance(body, dict):
        raise _BadRequestError("The request body must be a JSON object.", None)
    return body


def _bad_request(error: _BadRequestError) -> Response:
    return JSONResponse(
        wire.error_body(str(error), type_="invalid_request_error", param=error.param, code=None), status_code=400
    )


def _optional_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _BadRequestError(f"Invalid '{name}': expected an integer of at least 1, got {value!r}.", name)
    return value


def _model_of(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequestError("Missing required parameter: 'model'.", "model")
    return model


def _dicts(value: Iterable[Any], name: str) -> list[dict[str, Any]]:
    items = list(value)
    if not all(isinstance(item, dict) for item in items):
        raise _BadRequestError(f"Invalid '{name}': every item must be an object.", name)
    return items


def _chat_request(body: dict[str, Any]) -> RecordedRequest:
    model = _model_of(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequestError("Invalid 'messages': expected a non-empty array of messages.", "messages")
    return RecordedRequest(
        endpoint="chat.completions",
        model=model,
        messages=_dicts(messages, "messages"),
        stream=bool(body.get("stream")),
        max_tokens=_optional_int(body, "max_tokens"),
        max_completion_tokens=_optional_int(body, "max_completion_tokens"),
        max_output_tokens=None,
        tools=_dicts(body.get("tools") or [], "tools"),
        body=body,
    )


def _responses_request(body: dict[str, Any]) -> RecordedRequest:
    model = _model_of(body)
    given = body.get("input")
    if isinstance(given, str):
        items: list[dict[str, Any]] = [{"role": "user", "content": given}]
    elif isinstance(given, list) and given:
        items = _dicts(given, "input")
    else:
        raise _BadRequestError("Invalid 'input': expected a string or a non-empty array of input items.", "input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _BadRequestError("Invalid 'instructions': expected a string.", "instructions")
    return RecordedRequest(
        endpoint="responses",
        model=model,
        messages=items,
        stream=bool(body.get("stream")),
        max_tokens=None,
        max_completion_tokens=None,
        max_output_tokens=_optional_int(body, "max_output_tokens"),
        tools=_dicts(body.get("tools") or [], "tools"),
        instructions=instructions,
        body=body,
    )


def _event_stream(events: Iterable[str]) -> StreamingResponse:
    async def paced() -> AsyncIterator[str]:
        for event in events:
            yield event
            await asyncio.sleep(0)  # one event a write, so a client that closes early stops the stream

    return StreamingResponse(paced(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
