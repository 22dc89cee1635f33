"""Checks over CheckStream: many checks per message, answered in order; refusals as exceptions in their place."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import grpc

from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_api.v1 import budget_pb2_grpc as pb_grpc


def check_request(**fields: Any) -> pb.CheckRequest:
    labels: Mapping[str, str] = fields.pop("labels", None) or {}
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
    """One CheckStream kept open. ``check_many`` sends one message and waits for its answer; calls may overlap (the
    sidecar answers messages in order, so answers are matched to calls by order). If the stream fails, every waiting
    call and every later one raises the stream's error."""

    def __init__(self, stub: pb_grpc.BudgetServiceAsyncStub) -> None:
        self._call = stub.CheckStream()
        self._waiting: deque[asyncio.Future[pb.CheckStreamResponse]] = deque()
        self._sequence = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._failure: BaseException | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def check_many(self, checks: Iterable[CheckSpec]) -> list[pb.CheckResponse | CheckRefusedError]:
        if self._failure is not None:
            raise self._failure
        answer: asyncio.Future[pb.CheckStreamResponse] = asyncio.get_running_loop().create_future()
        request = stream_request(checks, next(self._sequence))
        async with self._write_lock:  # one write at a time, and the waiting order is the sending order
            self._waiting.append(answer)
            await self._call.write(request)
        return answers(await answer)

    async def _read(self) -> None:
        try:
            async for response in self._call:
                waiting = self._waiting.popleft()
                if not waiting.done():  # its caller may have stopped waiting (cancelled)
                    waiting.set_result(response)
            self._fail(grpc.RpcError("the sidecar ended the stream"))
        except grpc.RpcError as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        while self._waiting:
            waiting = self._waiting.popleft()
            if not waiting.done():
                waiting.set_exception(exc)

    async def aclose(self) -> None:
        """Ends the stream after the answers to what was sent."""
        if self._failure is None:
            async with self._write_lock:
                await self._call.done_writing()
        await self._reader
        self._failure = self._failure or grpc.RpcError("the stream is closed")

    async def __aenter__(self) -> CheckStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
