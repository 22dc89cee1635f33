"""BudgetAdminService: approvals, ceilings and resets. Served on its own listener, never to agents."""

from __future__ import annotations

from typing import Any

import grpc

from budgetwarden._decision import TASK_SCOPE
from budgetwarden._limiter import Limiter, StoreUnavailableError, UnknownCheckpointError
from budgetwarden._model import MAX_LIMIT_TOKENS, MAX_LIMIT_USD, Amount, Counter, Scope, ScopeKind
from budgetwarden._service import _invalid, _lenient, _Malformed, scope_state
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
    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    async def _decide(self, checkpoint: str, context: Context, *, approve: bool, add: Amount) -> tuple[int, Counter]:
        try:
            return await self.limiter.decide_checkpoint(checkpoint, approve=approve, add=add)
        except UnknownCheckpointError:
            await _invalid(context, "checkpoint_id: is not a checkpoint id issued by budgetwarden (ck1.…)")
        except StoreUnavailableError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"budget store unavailable: {exc}")

    async def approve(
        self, request: admin.ApproveCheckpointRequest | _Malformed, context: Context
    ) -> admin.ApproveCheckpointResponse:
        if isinstance(request, _Malformed):
            await _invalid(context, f"request: not a valid ApproveCheckpointRequest ({request.error})")
        try:
            checkpoint = ident(request.checkpoint_id, "checkpoint_id", max_bytes=1100)
            add = Amount(
                _amount(request.add_tokens, "add_tokens", MAX_LIMIT_TOKENS),
                _amount(request.add_usd_micros, "add_usd_micros", MAX_LIMIT_USD),
            )
        except InvalidRequestError as exc:
            await _invalid(context, str(exc))
        outcome, counter = await self._decide(checkpoint, context, approve=True, add=add)
        return admin.ApproveCheckpointResponse(outcome=outcome, task=_task_state(counter))  # type: ignore[arg-type]

    async def deny(
        self, request: admin.DenyCheckpointRequest | _Malformed, context: Context
    ) -> admin.DenyCheckpointResponse:
        if isinstance(request, _Malformed):
            await _invalid(context, f"request: not a valid DenyCheckpointRequest ({request.error})")
        try:
            checkpoint = ident(request.checkpoint_id, "checkpoint_id", max_bytes=1100)
        except InvalidRequestError as exc:
            await _invalid(context, str(exc))
        outcome, _ = await self._decide(checkpoint, context, approve=False, add=Amount(0))
        return admin.DenyCheckpointResponse(outcome=outcome)  # type: ignore[arg-type]

    async def set_ceiling(
        self, request: admin.SetTaskCeilingRequest | _Malformed, context: Context
    ) -> admin.SetTaskCeilingResponse:
        if isinstance(request, _Malformed):
            await _invalid(context, f"request: not a valid SetTaskCeilingRequest ({request.error})")
        try:
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
        except InvalidRequestError as exc:
            await _invalid(context, str(exc))
        add = request.mode == admin.CEILING_MODE_ADD
        try:
            counter = await self.limiter.set_ceiling(tenant_id, task_id, add=add, tokens=tokens, usd=usd)
        except StoreUnavailableError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"budget store unavailable: {exc}")
        return admin.SetTaskCeilingResponse(task=_task_state(counter))

    async def reset_task(
        self, request: admin.ResetTaskRequest | _Malformed, context: Context
    ) -> admin.ResetTaskResponse:
        if isinstance(request, _Malformed):
            await _invalid(context, f"request: not a valid ResetTaskRequest ({request.error})")
        try:
            tenant_id, task_id = ident(request.tenant_id, "tenant_id"), ident(request.task_id, "task_id")
        except InvalidRequestError as exc:
            await _invalid(context, str(exc))
        try:
            existed = await self.limiter.reset_task(tenant_id, task_id)
        except StoreUnavailableError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"budget store unavailable: {exc}")
        return admin.ResetTaskResponse(existed=existed)

    async def tenant_windows(
        self, request: admin.GetTenantWindowsRequest | _Malformed, context: Context
    ) -> admin.GetTenantWindowsResponse:
        if isinstance(request, _Malformed):
            await _invalid(context, f"request: not a valid GetTenantWindowsRequest ({request.error})")
        try:
            tenant_id = ident(request.tenant_id, "tenant_id")
        except InvalidRequestError as exc:
            await _invalid(context, str(exc))
        try:
            view = await self.limiter.budget(tenant_id, "", "")
        except StoreUnavailableError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"budget store unavailable: {exc}")
        return admin.GetTenantWindowsResponse(scopes=[scope_state(s, c) for s, c in view.scopes])

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(method: Any, request_type: Any, response_type: Any) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                method, request_deserializer=_lenient(request_type), response_serializer=response_type.SerializeToString
            )

        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "ApproveCheckpoint": unary(
                    self.approve, admin.ApproveCheckpointRequest, admin.ApproveCheckpointResponse
                ),
                "DenyCheckpoint": unary(self.deny, admin.DenyCheckpointRequest, admin.DenyCheckpointResponse),
                "SetTaskCeiling": unary(self.set_ceiling, admin.SetTaskCeilingRequest, admin.SetTaskCeilingResponse),
                "ResetTask": unary(self.reset_task, admin.ResetTaskRequest, admin.ResetTaskResponse),
                "GetTenantWindows": unary(
                    self.tenant_windows, admin.GetTenantWindowsRequest, admin.GetTenantWindowsResponse
                ),
            },
        )
