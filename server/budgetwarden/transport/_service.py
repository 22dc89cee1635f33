"""The gRPC transport: decodes requests, validates them, calls the limiter and encodes its answers.

Handlers are registered with a deserializer that never raises, so a malformed message becomes INVALID_ARGUMENT
rather than the INTERNAL that grpc would answer for a failing deserializer.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc.error_details_pb2 import BadRequest, ErrorInfo
from google.rpc.status_pb2 import Status
from grpc_status import rpc_status

from budgetwarden.domain import (
    CheckInput,
    Counter,
    Prompt,
    ReportStatus,
    Scope,
    ScopeKind,
    Thresholds,
    UsageInput,
    WindowSpan,
    remaining_of,
    threshold_of,
)
from budgetwarden.limiter import CheckResult, Limiter, StepConflictError, StoreUnavailableError
from budgetwarden.store import Applied, IdempotencyConflictError, reservation_id
from budgetwarden_api.v1 import budget_pb2 as pb

from ._validation import (
    InvalidRequestError,
    budget_target,
    check_input,
    message_prompt_chars,
    release_target,
    usage_inputs,
)

log = logging.getLogger("budgetwarden.service")

BUDGET_SERVICE_NAME = "budgetwarden.v1.BudgetService"
# Checks per CheckStream message: enough to amortise a round trip, small enough to bound one script call.
MAX_STREAM_CHECKS = 1000
M = TypeVar("M", bound=Message)
# Kept back from a caller's deadline so an answer (a fail-mode answer too) reaches it in time: the configured margin
# (``--deadline-margin-ms``), or this share of the time left when that is more. The fixed part covers a busy event
# loop and the trip back, which do not shrink with the deadline (measured in docs/benchmarks.md). Never more than
# half the time left, though: with Redis healthy, a short deadline still leaves the store time to decide.
MARGIN_SHARE = 0.1


class TenantRefusedError(Exception):
    """A request for a tenant that this (tenant-bound) sidecar does not serve; the transport's PERMISSION_DENIED."""


class _Malformed:
    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(message_type: type[M]) -> Callable[[bytes], M | _Malformed]:
    def parse(data: bytes) -> M | _Malformed:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return _Malformed(str(exc) or "cannot parse")

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


async def _invalid(
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
        await _invalid(context, exc, prefix)
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

    async def call(request: Message | _Malformed, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
        if isinstance(request, _Malformed):
            problem = f"not a valid {request_type.__name__} ({request.error})"
            await _invalid(context, InvalidRequestError("", problem), "request: ")
        return await method(request, context)

    return grpc.unary_unary_rpc_method_handler(
        call, request_deserializer=_lenient(request_type), response_serializer=response_type.SerializeToString
    )


async def _report_or_refuse(
    limiter: Limiter,
    records: Sequence[UsageInput],
    context: grpc.aio.ServicerContext[Any, Any],
    prefix: str = "",
    deadline_s: float | None = None,
) -> list[Applied]:
    """Apply usage records; a record reusing the idempotency marker of a different record is ALREADY_EXISTS, naming
    it (nothing of its script call was applied)."""
    try:
        return await limiter.report(records, deadline_s)
    except IdempotencyConflictError as exc:
        at = f"{prefix}records[{exc.index}]"
        if exc.keyless:
            message = (
                f"{at}: its step was already reported with different usage (a report without idempotency_key counts "
                "once per step); give each distinct report of a step its own idempotency_key"
            )
        else:
            message = (
                f"{at}.idempotency_key: already used for a different usage record (give each distinct record its own "
                "key; resend a record unchanged only to retry it)"
            )
        if exc.partial:
            message += (
                "; this request spanned several store calls (over 100 records, or several tenants): records of the "
                "other calls may be applied, so send them again without this one (they are idempotent)"
            )
        elif prefix:
            message += "; nothing of this message was applied (the messages before it were)"
        else:
            message += "; nothing of this request was applied"
        await context.abort(grpc.StatusCode.ALREADY_EXISTS, message)
        raise AssertionError("abort returned") from None  # pragma: no cover


def scope_state(scope: Scope, counter: Counter, thresholds: Thresholds | None = None) -> pb.ScopeState:
    state = pb.ScopeState()
    fill_scope_state(state, scope, counter, thresholds)
    return state


def fill_scope_state(state: pb.ScopeState, scope: Scope, counter: Counter, thresholds: Thresholds | None) -> None:
    state.CopyFrom(_scope_template(scope.name, scope.kind, scope.span))
    if counter.used:
        state.used_tokens = counter.used
    if counter.reserved:
        state.reserved_tokens = counter.reserved
    if counter.used_usd:
        state.used_usd_micros = counter.used_usd
    if counter.reserved_usd:
        state.reserved_usd_micros = counter.reserved_usd
    limit = counter.limit
    if limit is not None:
        state.limit_tokens = limit
        state.remaining_tokens = remaining_of(limit, counter.used, counter.reserved)
    if counter.limit_usd is not None:
        state.limit_usd_micros = counter.limit_usd
        state.remaining_usd_micros = remaining_of(counter.limit_usd, counter.used_usd, counter.reserved_usd)
    if thresholds is not None and limit is not None and scope.kind is ScopeKind.TASK:
        if thresholds.soft_bp is not None:
            state.soft_limit_tokens = threshold_of(limit, thresholds.soft_bp)  # type: ignore[assignment]
        if thresholds.checkpoint_bp is not None:
            state.checkpoint_limit_tokens = threshold_of(limit, thresholds.checkpoint_bp)  # type: ignore[assignment]


@functools.lru_cache(maxsize=1024)
def _scope_template(name: str, kind: ScopeKind, span: WindowSpan | None) -> pb.ScopeState:
    """What a scope's state holds whatever its counter: name, kind and window times. Built once per scope (a window's
    scope lives as long as the window) and copied, which is cheaper than setting timestamps field by field."""
    state = pb.ScopeState(name=name, kind=int(kind))  # type: ignore[arg-type]
    if span is not None:
        state.window = int(span.window)  # type: ignore[assignment]
        state.window_start.FromMilliseconds(span.start_ms)
        state.resets_at.FromMilliseconds(span.end_ms)
    return state


def check_response(result: CheckResult) -> pb.CheckResponse:
    response = pb.CheckResponse()
    fill_check_response(response, result)
    return response


def fill_check_response(response: pb.CheckResponse, result: CheckResult) -> None:
    """Fills a CheckResponse in place (a stream builds it inside its result message, without a copy)."""
    verdict = result.verdict
    response.decision = verdict.decision.value  # type: ignore[assignment]
    response.reason = verdict.reason.value  # type: ignore[assignment]
    response.granted_tokens = verdict.granted
    response.message = verdict.message
    response.requested_tokens = result.requested.tokens
    response.policy_version = result.policy_version
    # Fields at their default are left alone (proto3 sends nothing for them either way); setting one costs time.
    if result.reservation_id:
        response.reservation_id = result.reservation_id
    if verdict.binding_scope:
        response.binding_scope = verdict.binding_scope
    thresholds = result.thresholds
    for scope, counter in result.scopes:
        fill_scope_state(response.scopes.add(), scope, counter, thresholds)
    if result.from_fail_mode:
        response.from_fail_mode = True
    if result.replayed:
        response.replayed = True
    if verdict.granted_usd:
        response.granted_cost_usd_micros = verdict.granted_usd
    if result.requested.usd:
        response.requested_cost_usd_micros = result.requested.usd
    if result.model_assumed:
        response.model_assumed = True
    if verdict.checkpoint_id:
        response.checkpoint_id = verdict.checkpoint_id
    if verdict.binding_unit is not None:
        response.binding_unit = int(verdict.binding_unit)  # type: ignore[assignment]
    if result.lease_expires_ms is not None:
        response.lease_expires_at.FromMilliseconds(result.lease_expires_ms)
    if verdict.retry_after_ms is not None:
        response.retry_after.FromMilliseconds(verdict.retry_after_ms)
    if verdict.advice is not None:
        advice = verdict.advice
        response.advice.rung = advice.rung
        response.advice.model = advice.model
        response.advice.max_context_tokens = advice.max_context_tokens
        response.advice.max_output_tokens = advice.max_output_tokens
        if advice.max_tool_calls is not None:
            response.advice.max_tool_calls = advice.max_tool_calls
    if result.token_count is not None:
        count = result.token_count
        response.token_count.input_tokens = count.tokens
        response.token_count.encoding = count.encoding
        response.token_count.approximate = not count.exact


def _refuse(result: pb.CheckStreamResult, code: grpc.StatusCode, message: str) -> None:
    """A check of a CheckStream message refused with the code unary Check would answer."""
    result.error.code = code.value[0]
    result.error.message = message


class BudgetServicer:
    def __init__(
        self,
        limiter: Limiter,
        *,
        max_lease_seconds: int,
        bound_tenant: str | None = None,
        default_task_type: str | None = None,
        deadline_margin_s: float = 0.04,
    ) -> None:
        self.limiter = limiter
        self.deadline_margin_s = deadline_margin_s
        self.max_lease_seconds = max_lease_seconds
        self.bound_tenant = bound_tenant
        self.default_task_type = default_task_type

    def _bind_tenant(self, message: Any, field: str) -> None:
        """A sidecar bound to a tenant answers only for that tenant: an empty tenant_id means it, another is refused
        (TenantRefusedError, whose message starts with the field)."""
        if self.bound_tenant is None:
            return
        if not message.tenant_id:
            message.tenant_id = self.bound_tenant
        elif message.tenant_id != self.bound_tenant:
            raise TenantRefusedError(f"{field}: this sidecar serves tenant {self.bound_tenant!r} only")

    def _check_input(self, request: pb.CheckRequest) -> tuple[CheckInput, Prompt | None]:
        """A check as the limiter takes it: the bound tenant and the default task type applied, then validated.
        Raises TenantRefusedError or InvalidRequestError, whose messages start with the field."""
        self._bind_tenant(request, "tenant_id")
        if self.default_task_type and not request.task_type:
            request.task_type = self.default_task_type
        return check_input(request, max_lease_seconds=self.max_lease_seconds)

    async def check(self, request: pb.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.CheckResponse:
        async with answering(context):
            checked, prompt = self._check_input(request)
        async with answering(context):
            result = await self.limiter.check(checked, caller_time(context, self.deadline_margin_s), prompt)
        return check_response(result)

    async def check_stream(
        self, requests: AsyncIterator[pb.CheckStreamRequest | _Malformed], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.CheckStreamResponse]:
        """Messages are answered one after another, in order; the checks of a message go to the store together (one
        script call per tenant), each decided as a unary Check would decide it."""
        received = 0
        async for request in requests:
            if isinstance(request, _Malformed):
                problem = f"not a valid CheckStreamRequest ({request.error})"
                await _invalid(context, InvalidRequestError("", problem), f"message {received}: ")
            if len(request.checks) > MAX_STREAM_CHECKS:
                problem = f"holds {len(request.checks)}, at most {MAX_STREAM_CHECKS} are allowed"
                await _invalid(context, InvalidRequestError("checks", problem), f"message {received}: ")
            async with answering(context, prefix=f"message {received}: "):
                message_prompt_chars(request.checks)
            # The stream's deadline, if the caller set one.
            yield await self._check_batch(request, caller_time(context, self.deadline_margin_s))
            received += 1

    async def _check_batch(
        self, request: pb.CheckStreamRequest, deadline_s: float | None = None
    ) -> pb.CheckStreamResponse:
        response = pb.CheckStreamResponse(sequence=request.sequence)
        valid: list[tuple[int, pb.CheckStreamResult, CheckInput, Prompt | None]] = []
        for i, check in enumerate(request.checks):
            result = response.results.add()
            try:
                checked, prompt = self._check_input(check)
            except (TenantRefusedError, InvalidRequestError) as exc:
                refused = isinstance(exc, TenantRefusedError)  # the codes unary Check answers for each
                code = grpc.StatusCode.PERMISSION_DENIED if refused else grpc.StatusCode.INVALID_ARGUMENT
                _refuse(result, code, f"checks[{i}].{exc}")
                continue
            valid.append((i, result, checked, prompt))
        if valid:
            answers = await self.limiter.check_many([v[2] for v in valid], deadline_s, [v[3] for v in valid])
            for (i, result, _, _), answer in zip(valid, answers, strict=True):
                if isinstance(answer, StepConflictError):
                    _refuse(result, grpc.StatusCode.FAILED_PRECONDITION, f"checks[{i}].{answer}")
                else:
                    fill_check_response(result.response, answer)
        return response

    async def report_stream(
        self, requests: AsyncIterator[pb.ReportStreamRequest | _Malformed], context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReportStreamResponse:
        """Each message is validated and applied as it arrives; the one response acknowledges all of them."""
        totals = dict.fromkeys(ReportStatus, 0)
        received = 0
        async for request in requests:
            if isinstance(request, _Malformed):
                problem = f"not a valid ReportStreamRequest ({request.error})"
                await _invalid(context, InvalidRequestError("", problem), f"message {received}: ")
            async with answering(context, prefix=f"message {received}: "):
                for i, record in enumerate(request.records):
                    self._bind_tenant(record, f"message {received}: records[{i}].tenant_id")
                records = usage_inputs(request, self.limiter.clock())
            async with answering(context, retry_hint="; send the stream again (records are idempotent)"):
                deadline = caller_time(context, self.deadline_margin_s)
                applied = await _report_or_refuse(self.limiter, records, context, f"message {received}: ", deadline)
            for item in applied:
                totals[item.status] += 1
            received += 1
        return pb.ReportStreamResponse(
            records=sum(totals.values()),
            applied=totals[ReportStatus.APPLIED],
            duplicate=totals[ReportStatus.DUPLICATE],
            unreserved=totals[ReportStatus.UNRESERVED],
        )

    async def report(self, request: pb.ReportRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.ReportResponse:
        async with answering(context):
            for i, record in enumerate(request.records):
                self._bind_tenant(record, f"records[{i}].tenant_id")
            records = usage_inputs(request, self.limiter.clock())
        async with answering(
            context,
            # Records go to the store in script calls of up to 100 records of one tenant, each applied whole or not at
            # all, and a call may have been applied with its answer lost: a retry of the same records is safe.
            retry_hint="; the records may have been applied in part or in whole (each store call applies up to 100 "
            "records of one tenant, all or none): send the same records again unchanged, applied ones answer DUPLICATE",
        ):
            deadline = caller_time(context, self.deadline_margin_s)
            applied = await _report_or_refuse(self.limiter, records, context, deadline_s=deadline)
        results = []
        for item in applied:
            result = pb.ReportResult(
                status=int(item.status),  # type: ignore[arg-type]
                reservation_id=item.reservation_id,
                charged_tokens=item.charged,
                charged_cost_usd_micros=item.charged_usd,
                refunded_tokens=item.refunded,
                overage_tokens=item.overage,
                model=item.model,
                model_assumed=item.model_assumed,
            )
            if item.task is not None and item.task.remaining is not None:
                result.task_remaining_tokens = item.task.remaining
            results.append(result)
        return pb.ReportResponse(results=results)

    async def release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReleaseResponse:
        async with answering(context):
            self._bind_tenant(request, "tenant_id")
            tenant_id, rid, task_id, step_id = release_target(request)
        rid = rid or reservation_id(task_id, step_id)
        async with answering(context):
            status, amount = await self.limiter.release(tenant_id, rid, caller_time(context, self.deadline_margin_s))
        return pb.ReleaseResponse(status=status, reservation_id=rid, released_tokens=amount)  # type: ignore[arg-type]

    async def get_budget(
        self, request: pb.GetBudgetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetBudgetResponse:
        async with answering(context):
            self._bind_tenant(request, "tenant_id")
            tenant_id, task_id, task_type = budget_target(request)
            deadline = caller_time(context, self.deadline_margin_s)
            view = await self.limiter.budget(tenant_id, task_id, task_type, deadline)
        state = view.state
        response = pb.GetBudgetResponse(
            scopes=[scope_state(scope, counter, state.thresholds) for scope, counter in view.scopes],
            task_known=state.task_known,
            task_type=state.task_type,
            active_reservations=state.active_reservations,
            task_closed=state.closed,
        )
        if state.checkpoint_id:
            response.checkpoint.id = state.checkpoint_id
            response.checkpoint.opened_at.FromMilliseconds(state.checkpoint_at_ms)
        return response

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            BUDGET_SERVICE_NAME,
            {
                "Check": unary_handler(self.check, pb.CheckRequest, pb.CheckResponse),
                "CheckStream": grpc.stream_stream_rpc_method_handler(
                    self.check_stream,
                    request_deserializer=_lenient(pb.CheckStreamRequest),
                    response_serializer=pb.CheckStreamResponse.SerializeToString,
                ),
                "Report": unary_handler(self.report, pb.ReportRequest, pb.ReportResponse),
                "ReportStream": grpc.stream_unary_rpc_method_handler(
                    self.report_stream,
                    request_deserializer=_lenient(pb.ReportStreamRequest),
                    response_serializer=pb.ReportStreamResponse.SerializeToString,
                ),
                "Release": unary_handler(self.release, pb.ReleaseRequest, pb.ReleaseResponse),
                "GetBudget": unary_handler(self.get_budget, pb.GetBudgetRequest, pb.GetBudgetResponse),
            },
        )
