"""BudgetAdminService: approvals, ceilings and resets. Served on its own listener, never to agents."""

from __future__ import annotations

from typing import Any

import grpc

from budgetwarden._decision import TASK_SCOPE
from budgetwarden._limiter import Limiter, UnknownCheckpointError
from budgetwarden._model import MAX_LIMIT_TOKENS, MAX_LIMIT_USD, Amount, Counter, Scope, ScopeKind
from budgetwarden._service import _invalid, answering, caller_time, scope_state, unary_handler
from budgetwarden._validation import InvalidRequestError, ident
from budgetwarden_api.v1 import admin_pb2 as admin
from budgetwarden_api.v1 import budget_pb2 as pb

SERVICE_NAME = "budgetwarden.v1.BudgetAdminService"
Context = grpc.aio.ServicerContext[Any, Any]


def _amount(value: int, field: str, bound: int) -> int:
    if not 0 <= value <= bound:
        raise InvalidRequestError(field, f"must be between 0 and {bound} (got {value})")
    return value


def _task_state(counter: Counter) -> pb.ScopeState:
    return scope_state(Scope(TASK_SCOPE, ScopeKind.TASK, counter.limit, None, counter.limit_usd), counter)


class AdminServicer:
    def __init__(self, limiter: Limiter, *, deadline_margin_s: float = 0.04) -> None:
        self.limiter = limiter
        self.deadline_margin_s = deadline_margin_s

    async def _decide(self, checkpoint: str, context: Context, *, approve: bool, add: Amount) -> tuple[int, Counter]:
        try:
            async with answering(context):
                return await self.limiter.decide_checkpoint(
                    checkpoint, approve=approve, add=add, deadline_s=caller_time(context, self.deadline_margin_s)
                )
        except UnknownCheckpointError:
            await _invalid(context, "checkpoint_id: is not a checkpoint id issued by budgetwarden (ck1.…)")

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
            add = request.mode == admin.CEILING_MODE_ADD
            deadline = caller_time(context, self.deadline_margin_s)
            counter = await self.limiter.set_ceiling(
                tenant_id, task_id, add=add, tokens=tokens, usd=usd, deadline_s=deadline
            )
        return admin.SetTaskCeilingResponse(task=_task_state(counter))

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
            SERVICE_NAME,
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
