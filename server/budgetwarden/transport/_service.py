"""The gRPC transport: decodes requests, validates them, calls the limiter and encodes its answers.

Handlers are registered with a deserializer that never raises, so a malformed message becomes INVALID_ARGUMENT
rather than the INTERNAL that grpc would answer for a failing deserializer.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, NoReturn

import grpc

from budgetwarden.domain import (
    CheckInput,
    Prompt,
    ReportStatus,
    UsageInput,
)
from budgetwarden.limiter import Limiter, StepConflictError, StoreUnavailableError
from budgetwarden.store import Applied, IdempotencyConflictError, reservation_id
from budgetwarden_api.v1 import budget_pb2 as pb

from ._admission import Admission
from ._answering import (
    Malformed,
    TenantRefusedError,
    answering,
    caller_time,
    lenient,
    refuse_invalid,
    time_for_store,
    unary_handler,
)
from ._encoding import check_response, check_response_bytes, fill_check_response, scope_state
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


async def _refuse_malformed(
    context: grpc.aio.ServicerContext[Any, Any], request: Malformed, request_type: type[pb.CheckRequest]
) -> NoReturn:
    """INVALID_ARGUMENT for bytes that do not parse, as unary_handler answers them."""
    problem = f"not a valid {request_type.__name__} ({request.error})"
    await refuse_invalid(context, InvalidRequestError("", problem), "request: ")
    raise AssertionError("refuse_invalid returned")  # pragma: no cover


async def _answer_error(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> NoReturn:
    """Aborts the call with the status ``answering`` maps ``error`` to."""
    async with answering(context):
        raise error
    raise AssertionError("answering returned") from error  # pragma: no cover


def _shed_message(reason: str) -> str:
    return f"overloaded: {reason}; nothing was reserved, retry with backoff"


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
        admission: Admission | None = None,
    ) -> None:
        self.limiter = limiter
        self.admission = admission or Admission(0, 1.0)
        self.deadline_margin_s = deadline_margin_s
        self.max_lease_seconds = max_lease_seconds
        self.bound_tenant = bound_tenant
        self.default_task_type = default_task_type
        # With a local allowance, most answers repeat their slice's scopes: their encoding is remembered.
        self._remember_scopes = limiter.allowances is not None

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

    async def check(self, request: pb.CheckRequest | Malformed, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        # The unary hot path, registered without unary_handler's wrapper (one coroutine less per check): errors are
        # mapped by ``answering`` only when one is raised (entering its async context manager on every check cost more
        # than the validation it guards; docs/benchmarks.md, issue 17). It answers the encoded response (registered
        # without a serializer), so that a local slice's scopes are encoded once (check_response_bytes).
        if isinstance(request, Malformed):
            await _refuse_malformed(context, request, pb.CheckRequest)
        try:
            checked, prompt = self._check_input(request)
        except (InvalidRequestError, TenantRefusedError) as exc:
            await _answer_error(context, exc)
        tenant_id = checked.tenant_id
        # Without a caller deadline nothing comes too late: the check deadline and fail mode handle a slow store.
        entered_at = self.admission.clock()
        remaining = context.time_remaining()  # read once: admission and the store's share both start from it
        refused = self.admission.enter(tenant_id, remaining)
        if refused is not None:
            self.limiter.telemetry.shed(tenant_id, refused.reason)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _shed_message(refused))
        try:
            store_s = None if remaining is None else time_for_store(remaining, self.deadline_margin_s)
            result = await self.limiter.check(checked, store_s, prompt)
        except (StepConflictError, StoreUnavailableError) as exc:
            await _answer_error(context, exc)
        finally:
            self.admission.leave(tenant_id, entered_at)
        if self._remember_scopes:
            return check_response_bytes(result)
        return check_response(result).SerializeToString()

    async def check_stream(
        self, requests: AsyncIterator[pb.CheckStreamRequest | Malformed], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.CheckStreamResponse]:
        """Messages are answered one after another, in order; the checks of a message go to the store together (one
        script call per tenant), each decided as a unary Check would decide it."""
        received = 0
        async for request in requests:
            if isinstance(request, Malformed):
                problem = f"not a valid CheckStreamRequest ({request.error})"
                await refuse_invalid(context, InvalidRequestError("", problem), f"message {received}: ")
            if len(request.checks) > MAX_STREAM_CHECKS:
                problem = f"holds {len(request.checks)}, at most {MAX_STREAM_CHECKS} are allowed"
                await refuse_invalid(context, InvalidRequestError("checks", problem), f"message {received}: ")
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
        admitted: list[tuple[int, pb.CheckStreamResult, CheckInput, Prompt | None]] = []
        for entry in valid:
            tenant_id = entry[2].tenant_id
            overloaded = self.admission.enter(tenant_id)
            if overloaded is None:
                admitted.append(entry)
            else:
                self.limiter.telemetry.shed(tenant_id, overloaded.reason)
                _refuse(
                    entry[1], grpc.StatusCode.RESOURCE_EXHAUSTED, f"checks[{entry[0]}]: {_shed_message(overloaded)}"
                )
        try:
            if admitted:
                answers = await self.limiter.check_many([v[2] for v in admitted], deadline_s, [v[3] for v in admitted])
                for (i, result, _, _), answer in zip(admitted, answers, strict=True):
                    if isinstance(answer, StepConflictError):
                        _refuse(result, grpc.StatusCode.FAILED_PRECONDITION, f"checks[{i}].{answer}")
                    else:
                        fill_check_response(result.response, answer)
        finally:
            for entry in admitted:
                self.admission.leave(entry[2].tenant_id)
        return response

    async def report_stream(
        self, requests: AsyncIterator[pb.ReportStreamRequest | Malformed], context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReportStreamResponse:
        """Each message is validated and applied as it arrives; the one response acknowledges all of them."""
        totals = dict.fromkeys(ReportStatus, 0)
        received = 0
        async for request in requests:
            if isinstance(request, Malformed):
                problem = f"not a valid ReportStreamRequest ({request.error})"
                await refuse_invalid(context, InvalidRequestError("", problem), f"message {received}: ")
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
                "Check": grpc.unary_unary_rpc_method_handler(
                    self.check,
                    request_deserializer=lenient(pb.CheckRequest),
                    response_serializer=None,  # check() answers bytes
                ),
                "CheckStream": grpc.stream_stream_rpc_method_handler(
                    self.check_stream,
                    request_deserializer=lenient(pb.CheckStreamRequest),
                    response_serializer=pb.CheckStreamResponse.SerializeToString,
                ),
                "Report": unary_handler(self.report, pb.ReportRequest, pb.ReportResponse),
                "ReportStream": grpc.stream_unary_rpc_method_handler(
                    self.report_stream,
                    request_deserializer=lenient(pb.ReportStreamRequest),
                    response_serializer=pb.ReportStreamResponse.SerializeToString,
                ),
                "Release": unary_handler(self.release, pb.ReleaseRequest, pb.ReleaseResponse),
                "GetBudget": unary_handler(self.get_budget, pb.GetBudgetRequest, pb.GetBudgetResponse),
            },
        )
