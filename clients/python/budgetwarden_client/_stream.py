"""Checks over CheckStream: many checks per message, answered in order; refusals as exceptions in their place."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import grpc

from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_api.v1 import budget_pb2_grpc as pb_grpc
from budgetwarden_client._messages import chat_prompt


def check_request(**fields: Any) -> pb.CheckRequest:
    """A CheckRequest from its fields; ``messages`` (with ``tools``), or a list as ``prompt_messages``, may hold
    OpenAI-format chat messages (see ``_messages``)."""
    labels: Mapping[str, str] = fields.pop("labels", None) or {}
    messages = fields.pop("messages", None)
    tools = fields.pop("tools", None)
    if messages is None and isinstance(fields.get("prompt_messages"), (list, tuple)):
        messages = fields.pop("prompt_messages")  # a list of messages, not a ChatPrompt (or a dict of one)
    if messages is not None:
        fields["prompt_messages"] = chat_prompt(messages, tools).prompt
    elif tools:
        raise ValueError("tools are counted with messages: give messages too")
    request = pb.CheckRequest(**fields)
    request.labels.update(labels)
    return request


CheckSpec = pb.CheckRequest | Mapping[str, Any]


class CheckRefusedError(grpc.RpcError):
    """One check of a CheckStream message that the sidecar refused, with the status a unary Check would have had."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


_STATUS_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}


def stream_request(checks: Iterable[CheckSpec], sequence: int = 0) -> pb.CheckStreamRequest:
    request = pb.CheckStreamRequest(sequence=sequence)
    for check in checks:
        request.checks.append(check if isinstance(check, pb.CheckRequest) else check_request(**check))
    return request


def answers(response: pb.CheckStreamResponse) -> list[pb.CheckResponse | CheckRefusedError]:
    """Each check's answer, or the refusal a unary Check would have raised."""
    out: list[pb.CheckResponse | CheckRefusedError] = []
    for result in response.results:
        if result.HasField("error"):
            code = _STATUS_BY_NUMBER.get(result.error.code, grpc.StatusCode.UNKNOWN)
            out.append(CheckRefusedError(code, result.error.message))
        else:
            out.append(result.response)
    return out


class CheckStream:
    """One CheckStream kept open. ``check_many`` sends one message and waits for its answer, matched by sequence.
    Calls may overlap, and a caller that stops waiting (cancelled, or past the session's ``timeout``) leaves the
    stream and the other calls alone. If the stream fails, every waiting call and every later one raises its error."""

    def __init__(self, stub: pb_grpc.BudgetServiceAsyncStub, *, timeout: float | None = None) -> None:
        self.timeout = timeout
        self._call = stub.CheckStream()
        self._waiting: dict[int, asyncio.Future[pb.CheckStreamResponse]] = {}
        self._sequence = itertools.count(1)
        # One writer task sends everything: a cancelled caller never cancels a write half-way (that would end the call).
        self._outbox: asyncio.Queue[pb.CheckStreamRequest | None] = asyncio.Queue()
        self._failure: BaseException | None = None
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write())
        self._reader = loop.create_task(self._read())

    async def check_many(self, checks: Iterable[CheckSpec]) -> list[pb.CheckResponse | CheckRefusedError]:
        """At most 1000 checks; raises TimeoutError after the session's timeout (None: wait as long as it takes)."""
        if self._failure is not None:
            raise self._failure
        sequence = next(self._sequence)
        answer: asyncio.Future[pb.CheckStreamResponse] = asyncio.get_running_loop().create_future()
        self._waiting[sequence] = answer
        self._outbox.put_nowait(stream_request(checks, sequence))
        try:
            async with asyncio.timeout(self.timeout):
                return answers(await answer)
        finally:
            self._waiting.pop(sequence, None)

    async def _write(self) -> None:
        try:
            while (request := await self._outbox.get()) is not None:
                await self._call.write(request)
            await self._call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:  # the call ended: the reader reports why
            self._fail(exc)

    async def _read(self) -> None:
        failure: BaseException = grpc.RpcError("the sidecar ended the stream")
        try:
            async for response in self._call:
                waiting = self._waiting.pop(response.sequence, None)
                if waiting is not None and not waiting.done():
                    waiting.set_result(response)
        except grpc.RpcError as exc:
            failure = exc
        except asyncio.CancelledError:
            failure = grpc.RpcError("the stream was cancelled (its channel closed)")
            raise
        finally:
            self._fail(failure)

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        for waiting in self._waiting.values():
            if not waiting.done():
                waiting.set_exception(self._failure)
        self._waiting.clear()

    async def aclose(self) -> None:
        """Ends the stream after the answers to what was sent."""
        self._outbox.put_nowait(None)
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)
        self._fail(grpc.RpcError("the stream is closed"))

    async def __aenter__(self) -> CheckStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
