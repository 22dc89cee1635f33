"""BudgetAdminService: approvals, ceilings and resets. Served on its own listener, never to agents."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc

from budgetwarden.domain import MAX_LIMIT_TOKENS, MAX_LIMIT_USD, Amount, Counter, Unit, task_scope
from budgetwarden.limiter import Limiter, UnknownCheckpointError
from budgetwarden.store import CeilingRefusedError, RequestIdReusedError
from budgetwarden_api.v1 import admin_pb2 as admin
from budgetwarden_api.v1 import budget_pb2 as pb

from ._answering import answering, caller_time, refuse_invalid, unary_handler
from ._encoding import scope_state
from ._validation import InvalidRequestError, ident

ADMIN_SERVICE_NAME = "budgetwarden.v1.BudgetAdminService"
Context = grpc.aio.ServicerContext[Any, Any]


def _amount(value: int, field: str, bound: int) -> int:
    if not 0 <= value <= bound:
        raise InvalidRequestError(field, f"must be between 0 and {bound} (got {value})")
    return value


# The request field that carries each ceiling's amount, to name it in a refusal.
_APPROVE_FIELDS = {Unit.TOKENS: "add_tokens", Unit.USD: "add_usd_micros"}
_CEILING_FIELDS = {Unit.TOKENS: "ceiling_tokens", Unit.USD: "ceiling_usd_micros"}


@contextlib.asynccontextmanager
async def _ceiling_refusals(context: Context, fields: Mapping[Unit, str]) -> AsyncIterator[None]:
    """A change the task's state refuses (nothing was written) is FAILED_PRECONDITION, naming the field: retrying the
    same request cannot succeed. A request id reused for another change is ALREADY_EXISTS."""
    try:
        yield
    except CeilingRefusedError as exc:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{fields[exc.unit]}: {exc}")
    except RequestIdReusedError:
        await context.abort(
            grpc.StatusCode.ALREADY_EXISTS,
            "request_id: was used for another change to this task's ceiling; nothing was changed",
        )


def _task_state(counter: Counter) -> pb.ScopeState:
    return scope_state(task_scope(counter), counter)


class AdminServicer:
    def __init__(self, limiter: Limiter, *, deadline_margin_s: float = 0.04) -> None:
        self.limiter = limiter
        self.deadline_margin_s = deadline_margin_s

    async def _decide(self, checkpoint: str, context: Context, *, approve: bool, add: Amount) -> tuple[int, Counter]:
        try:
            async with _ceiling_refusals(context, _APPROVE_FIELDS), answering(context):
                return await self.limiter.decide_checkpoint(
                    checkpoint, approve=approve, add=add, deadline_s=caller_time(context, self.deadline_margin_s)
                )
        except UnknownCheckpointError:
            problem = "is not a checkpoint id issued by budgetwarden (ck1.…)"
            await refuse_invalid(context, InvalidRequestError("checkpoint_id", problem))

    async def approve(
        self, request: admin.ApproveCheckpointRequest, context: Context
    ) -> admin.ApproveCheckpointResponse:
        async with answering(context):
            checkpoint = ident(request.checkpoint_id, "checkpoint_id", max_bytes=1100)
            add = Amount(
                _amount(request.add_tokens, "add_tokens", MAX_LIMIT_TOKENS),
                _amount(request.add_usd_micros, "add_usd_micros", MAX_LIMIT_USD),
            )
        outcome, counter = await self._decide(checkpoint, context, approve=True, add=add)
        return admin.ApproveCheckpointResponse(outcome=outcome, task=_task_state(counter))  # type: ignore[arg-type]

    async def deny(self, request: admin.DenyCheckpointRequest, context: Context) -> admin.DenyCheckpointResponse:
        async with answering(context):
            checkpoint = ident(request.checkpoint_id, "checkpoint_id", max_bytes=1100)
        outcome, _ = await self._decide(checkpoint, context, approve=False, add=Amount(0))
        return admin.DenyCheckpointResponse(outcome=outcome)  # type: ignore[arg-type]

    async def set_ceiling(self, request: admin.SetTaskCeilingRequest, context: Context) -> admin.SetTaskCeilingResponse:
        async with answering(context):
            tenant_id = ident(request.tenant_id, "tenant_id")
            task_id = ident(request.task_id, "task_id")
            if request.mode not in (admin.CEILING_MODE_SET, admin.CEILING_MODE_ADD):
                raise InvalidRequestError("mode", "must be CEILING_MODE_SET or CEILING_MODE_ADD")
            tokens = usd = None
            if request.HasField("ceiling_tokens"):
                tokens = _amount(request.ceiling_tokens, "ceiling_tokens", MAX_LIMIT_TOKENS)
            if request.HasField("ceiling_usd_micros"):
                usd = _amount(request.ceiling_usd_micros, "ceiling_usd_micros", MAX_LIMIT_USD)
            if tokens is None and usd is None:
                raise InvalidRequestError("ceiling_tokens", "or ceiling_usd_micros is required")
            # Without the caller's id, one of ours still makes the Redis client's retry after a dropped connection
            # (redis_client in _server.py) safe: a resent script call does not add twice.
            callers_id = ident(request.request_id, "request_id", required=False)
            add = request.mode == admin.CEILING_MODE_ADD
        async with _ceiling_refusals(context, _CEILING_FIELDS), answering(context):
            change = await self.limiter.set_ceiling(
                tenant_id,
                task_id,
                add=add,
                tokens=tokens,
                usd=usd,
                request_id=callers_id or f"bw-{uuid.uuid4().hex}",
                deadline_s=caller_time(context, self.deadline_margin_s),
            )
        # Our own id seen again is this call's own resend: for the caller, the change was made now.
        replayed = change.replayed and bool(callers_id)
        return admin.SetTaskCeilingResponse(task=_task_state(change.task), replayed=replayed)

    async def reset_task(self, request: admin.ResetTaskRequest, context: Context) -> admin.ResetTaskResponse:
        async with answering(context):
            tenant_id, task_id = ident(request.tenant_id, "tenant_id"), ident(request.task_id, "task_id")
            existed = await self.limiter.reset_task(tenant_id, task_id, caller_time(context, self.deadline_margin_s))
        return admin.ResetTaskResponse(existed=existed)

    async def tenant_windows(
        self, request: admin.GetTenantWindowsRequest, context: Context
    ) -> admin.GetTenantWindowsResponse:
        async with answering(context):
            tenant_id = ident(request.tenant_id, "tenant_id")
            view = await self.limiter.budget(tenant_id, "", "", caller_time(context, self.deadline_margin_s))
        return admin.GetTenantWindowsResponse(scopes=[scope_state(s, c) for s, c in view.scopes])

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            ADMIN_SERVICE_NAME,
            {
                "ApproveCheckpoint": unary_handler(
                    self.approve, admin.ApproveCheckpointRequest, admin.ApproveCheckpointResponse
                ),
                "DenyCheckpoint": unary_handler(self.deny, admin.DenyCheckpointRequest, admin.DenyCheckpointResponse),
                "SetTaskCeiling": unary_handler(
                    self.set_ceiling, admin.SetTaskCeilingRequest, admin.SetTaskCeilingResponse
                ),
                "ResetTask": unary_handler(self.reset_task, admin.ResetTaskRequest, admin.ResetTaskResponse),
                "GetTenantWindows": unary_handler(
                    self.tenant_windows, admin.GetTenantWindowsRequest, admin.GetTenantWindowsResponse
                ),
            },
        )
