"""Error mapping: what the layers below raise becomes a status code (with rich details), a malformed message
becomes INVALID_ARGUMENT instead of the INTERNAL grpc would answer for a failing deserializer, and a caller's deadline
becomes the time the store may take."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc.error_details_pb2 import BadRequest, ErrorInfo
from google.rpc.status_pb2 import Status
from grpc_status import rpc_status

from budgetwarden.limiter import StepConflictError, StoreUnavailableError

from ._validation import InvalidRequestError

M = TypeVar("M", bound=Message)

# Kept back from a caller's deadline so an answer (a fail-mode answer too) reaches it in time: the configured margin
# (``--deadline-margin-ms``), or this share of the time left when that is more. The fixed part covers a busy event
# loop and the trip back, which do not shrink with the deadline (measured in docs/benchmarks.md). Never more than
# half the time left, though: with Redis healthy, a short deadline still leaves the store time to decide.
MARGIN_SHARE = 0.1


class TenantRefusedError(Exception):
    """A request for a tenant that this (tenant-bound) sidecar does not serve; the transport's PERMISSION_DENIED."""


class Malformed:
    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def lenient(message_type: type[M]) -> Callable[[bytes], M | Malformed]:
    def parse(data: bytes) -> M | Malformed:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return Malformed(str(exc) or "cannot parse")

    return parse


def time_for_store(remaining_s: float | None, margin_s: float) -> float | None:
    """What the limiter may spend waiting for the store, out of ``remaining_s`` left of the caller's deadline (None:
    the caller set none): the remaining time less the margin, which is at most half of it."""
    if remaining_s is None:
        return None
    remaining_s = max(0.0, remaining_s)
    return remaining_s - min(max(margin_s, remaining_s * MARGIN_SHARE), remaining_s / 2)


def caller_time(context: grpc.aio.ServicerContext[Any, Any], margin_s: float) -> float | None:
    """``time_for_store`` for this call's deadline."""
    return time_for_store(context.time_remaining(), margin_s)


# google.rpc.ErrorInfo of an UNAVAILABLE that the sidecar answered itself (its store failed), so a client can tell it
# from a sidecar it could not reach.
ERROR_DOMAIN = "budgetwarden.io"
STORE_UNAVAILABLE = "STORE_UNAVAILABLE"


async def _abort_with_details(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str, detail: Message
) -> NoReturn:
    """Abort with ``message`` and a google.rpc.Status carrying ``detail`` in grpc-status-details-bin (what grpcio-status
    reads with rpc_status.from_call, and other languages' rich error models)."""
    packed = any_pb2.Any()
    packed.Pack(detail)
    status = rpc_status.to_status(Status(code=code.value[0], message=message, details=[packed]))
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("abort returned")  # pragma: no cover


async def refuse_invalid(
    context: grpc.aio.ServicerContext[Any, Any], error: InvalidRequestError, prefix: str = ""
) -> NoReturn:
    """INVALID_ARGUMENT whose message names the field, with a google.rpc.BadRequest holding the field's path and the
    problem for programs. ``prefix`` places the message ("message 3: " in a stream); an empty field is the whole
    message (bytes that do not parse)."""
    violation = BadRequest.FieldViolation(field=error.field, description=error.problem)
    await _abort_with_details(
        context,
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{prefix}{error}",
        BadRequest(field_violations=[violation]),
    )


@contextlib.asynccontextmanager
async def answering(
    context: grpc.aio.ServicerContext[Any, Any], *, prefix: str = "", retry_hint: str = ""
) -> AsyncIterator[None]:
    """Maps what the layers below raise to status codes: bad input to INVALID_ARGUMENT (the message names the field,
    a BadRequest detail carries it), another tenant to PERMISSION_DENIED, a step checked before with another request
    to FAILED_PRECONDITION, an unavailable store to UNAVAILABLE (with an ErrorInfo detail: the sidecar answered, its
    store did not)."""
    try:
        yield
    except InvalidRequestError as exc:
        await refuse_invalid(context, exc, prefix)
    except TenantRefusedError as exc:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
    except StepConflictError as exc:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    except StoreUnavailableError as exc:
        await _abort_with_details(
            context,
            grpc.StatusCode.UNAVAILABLE,
            f"budget store unavailable: {exc}{retry_hint}",
            ErrorInfo(reason=STORE_UNAVAILABLE, domain=ERROR_DOMAIN),
        )


def unary_handler(
    method: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]],
    request_type: type[Message],
    response_type: type[Message],
) -> grpc.RpcMethodHandler[Any, Any]:
    """A unary handler whose method only ever sees a parsed request: bytes that do not parse are INVALID_ARGUMENT."""

    async def call(request: Message | Malformed, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
        if isinstance(request, Malformed):
            problem = f"not a valid {request_type.__name__} ({request.error})"
            await refuse_invalid(context, InvalidRequestError("", problem), "request: ")
        return await method(request, context)

    return grpc.unary_unary_rpc_method_handler(
        call, request_deserializer=lenient(request_type), response_serializer=response_type.SerializeToString
    )
