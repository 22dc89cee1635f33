"""BudgetAdminService: approvals, ceilings, resets and the list of checkpoints. Served on its own listener (a
sidecar's, for local use, or the control plane's), never to agents.

Every call is authenticated first (``_auth``: UNAUTHENTICATED), its request validated (INVALID_ARGUMENT), then
authorised against the tenant it acts on (PERMISSION_DENIED): the role the call needs, and the caller's tenants. A
checkpoint's tenant is the one whose keys its id addresses, the only keys a decision on it can touch. Each change is
recorded in the tenant's audit stream by the same script that makes it; each refusal is recorded too."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, NoReturn

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from budgetwarden.domain import MAX_LIMIT_TOKENS, MAX_LIMIT_USD, Amount, Counter, Unit, task_scope
from budgetwarden.limiter import Limiter, UnknownCheckpointError
from budgetwarden.store import CeilingRefusedError, CheckpointCursor, CheckpointRecord, RequestIdReusedError
from budgetwarden_api.v1 import admin_pb2 as admin
from budgetwarden_api.v1 import budget_pb2 as pb

from ._answering import Malformed, answering, caller_time, lenient, refuse_invalid
from ._auth import AccessFile, Identity, Role, UnauthenticatedError, authenticate
from ._encoding import scope_state
from ._validation import InvalidRequestError, ident

ADMIN_SERVICE_NAME = "budgetwarden.v1.BudgetAdminService"
Context = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger("budgetwarden.admin")

# The least role each call needs.
RPC_ROLES = {
    "GetTenantWindows": Role.VIEWER,
    "ListCheckpoints": Role.VIEWER,
    "ApproveCheckpoint": Role.APPROVER,
    "DenyCheckpoint": Role.APPROVER,
    "SetTaskCeiling": Role.ADMIN,
    "ResetTask": Role.ADMIN,
}
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 500
# Request strings longer than this are cut in audit entries: an entry records what was asked, not a payload.
AUDIT_TEXT_LIMIT = 256


def authorisation_refusal(identity: Identity, rpc: str, tenant_id: str) -> str | None:
    """Why ``identity`` may not make the call ``rpc`` on ``tenant_id`` (its role, then its tenants), or None when it
    may. The one place the rule lives: the gRPC service and the console both ask it."""
    needed = RPC_ROLES[rpc]
    if identity.role < needed:
        return f"{rpc} needs the role {needed.name.lower()} or above; {identity.name!r} is {identity.role_name}"
    if not identity.may_act_on(tenant_id):
        return f"{identity.name!r} may not act on tenant {tenant_id!r}"
    return None


def audit_entry(
    now_ms: int, rpc: str, identity: Identity | None, peer: str, tenant_id: str | None, request: dict[str, Any]
) -> dict[str, Any]:
    """An audit entry as the caller's side knows it (the store adds the outcome and the counters): when, which call,
    who, with which role, how they proved it, from where, on which tenant, what they asked."""
    return {
        "time": datetime.fromtimestamp(now_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "time_ms": now_ms,
        "rpc": rpc,
        "who": identity.name if identity else "",
        "role": identity.role_name if identity else "",
        "via": identity.via if identity else "",
        "peer": peer,
        "tenant_id": tenant_id or "",
        "request": request,
    }


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


def _request_summary(request: Message | None) -> dict[str, Any]:
    if request is None:
        return {}
    fields = MessageToDict(request, preserving_proto_field_name=True)
    return {k: v[:AUDIT_TEXT_LIMIT] if isinstance(v, str) else v for k, v in fields.items()}


# --- page tokens (AIP-158): opaque to callers, tied to the tenant and filter they were issued for ---------------------


def _page_token(tenant_id: str, decided: bool, cursor: CheckpointCursor) -> str:
    data = {"t": tenant_id, "d": decided, "s": cursor.score, "i": cursor.checkpoint_id}
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode().rstrip("=")


def _read_page_token(token: str, tenant_id: str, decided: bool) -> CheckpointCursor | None:
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        cursor = CheckpointCursor(str(data["s"]), str(data["i"]))
        issued_for = (data["t"], data["d"])
    except (ValueError, binascii.Error, KeyError, TypeError):
        raise InvalidRequestError("page_token", "is not a next_page_token of ListCheckpoints") from None
    if not cursor.score.isdigit():
        raise InvalidRequestError("page_token", "is not a next_page_token of ListCheckpoints")
    if issued_for != (tenant_id, decided):
        raise InvalidRequestError("page_token", "was issued for another tenant_id or filter")
    return cursor


_STATES = {
    "open": admin.CHECKPOINT_STATE_OPEN,
    "approved": admin.CHECKPOINT_STATE_APPROVED,
    "denied": admin.CHECKPOINT_STATE_DENIED,
}


def _summary(record: CheckpointRecord) -> admin.CheckpointSummary:
    summary = admin.CheckpointSummary(
        checkpoint_id=record.checkpoint_id,
        tenant_id=record.tenant_id,
        task_id=record.task_id,
        task_type=record.task_type,
        state=_STATES.get(record.state, admin.CHECKPOINT_STATE_UNSPECIFIED),
        added_tokens=record.added.tokens,
        added_usd_micros=record.added.usd,
    )
    summary.opened_at.FromMilliseconds(record.opened_at_ms)
    if record.decided_at_ms:
        summary.decided_at.FromMilliseconds(record.decided_at_ms)
    if record.task is not None:
        summary.task.CopyFrom(_task_state(record.task))
    return summary


Method = Callable[[Any, Context, Identity], Awaitable[Message]]


class AdminServicer:
    """``access``: the admin tokens file; None serves every caller as an admin of every tenant (a loopback listener
    only: the application refuses a wider one without a file)."""

    def __init__(self, limiter: Limiter, *, deadline_margin_s: float = 0.04, access: AccessFile | None = None) -> None:
        self.limiter = limiter
        self.deadline_margin_s = deadline_margin_s
        self.access = access

    # --- who calls, and may they -------------------------------------------------------------------------------

    def _entry(
        self, context: Context, rpc: str, identity: Identity | None, tenant_id: str | None, request: Message | None
    ) -> dict[str, Any]:
        """The audit entry of a call, as the transport knows it (the store adds the outcome and the counters)."""
        return audit_entry(
            self.limiter.clock(), rpc, identity, context.peer() or "", tenant_id, _request_summary(request)
        )

    def _audit(self, context: Context, rpc: str, identity: Identity, tenant_id: str, request: Message) -> str:
        return json.dumps(self._entry(context, rpc, identity, tenant_id, request), separators=(",", ":"))

    async def _refuse(
        self,
        context: Context,
        rpc: str,
        identity: Identity | None,
        tenant_id: str | None,
        request: Message | None,
        code: grpc.StatusCode,
        reason: str,
    ) -> NoReturn:
        """Record the refusal in the audit trail (the tenant's, or the global one when none is known), then refuse.
        An audit trail that cannot be written is logged: the refusal stands either way."""
        entry = self._entry(context, rpc, identity, tenant_id, request) | {"reason": reason}
        log.warning("admin call refused", extra={k: entry[k] for k in ("rpc", "who", "role", "peer", "tenant_id")})
        fields = {"entry": json.dumps(entry, separators=(",", ":")), "outcome": code.name}
        try:
            await self.limiter.record_refusal(tenant_id, fields, caller_time(context, self.deadline_margin_s))
        except Exception as exc:  # the refusal is the answer whatever the store does
            log.error("cannot record a refused admin call in the audit trail", extra={"error": repr(exc), "rpc": rpc})
        await context.abort(code, reason)
        raise AssertionError("abort returned")  # pragma: no cover

    async def _authorise(
        self, context: Context, rpc: str, identity: Identity, tenant_id: str, request: Message
    ) -> None:
        reason = authorisation_refusal(identity, rpc, tenant_id)
        if reason is None:
            return
        await self._refuse(context, rpc, identity, tenant_id, request, grpc.StatusCode.PERMISSION_DENIED, reason)

    def _handler(self, rpc: str, method: Method, request_type: type[Message], response_type: type[Message]) -> Any:
        """A unary handler that authenticates before anything else, then hands a parsed request to ``method``."""

        async def call(request: Message | Malformed, context: Context) -> Message:
            outcome = "UNKNOWN"
            try:
                response = await authenticated_call(request, context)
                outcome = "OK"
                return response
            except grpc.aio.AbortError:
                code = context.code()
                outcome = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
                raise
            finally:
                self.limiter.telemetry.admin_call(rpc, outcome, "grpc")

        async def authenticated_call(request: Message | Malformed, context: Context) -> Message:
            parsed = None if isinstance(request, Malformed) else request
            try:
                identity = authenticate(self.access, context)
            except UnauthenticatedError as exc:
                await self._refuse(context, rpc, None, None, parsed, grpc.StatusCode.UNAUTHENTICATED, str(exc))
            if isinstance(request, Malformed):
                problem = f"not a valid {request_type.__name__} ({request.error})"
                await refuse_invalid(context, InvalidRequestError("", problem), "request: ")
            return await method(request, context, identity)

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=lenient(request_type), response_serializer=response_type.SerializeToString
        )

    # --- the calls ---------------------------------------------------------------------------------------------

    async def _checkpoint_owner(self, request: Any, context: Context) -> tuple[str, str]:
        async with answering(context):
            checkpoint = ident(request.checkpoint_id, "checkpoint_id", max_bytes=1100)
            try:
                tenant_id, _ = self.limiter.checkpoint_owner(checkpoint)
            except UnknownCheckpointError:
                raise InvalidRequestError(
                    "checkpoint_id", "is not a checkpoint id issued by budgetwarden (ck1.…)"
                ) from None
        return checkpoint, tenant_id

    async def _decide(
        self, checkpoint: str, context: Context, *, approve: bool, add: Amount, audit: str
    ) -> tuple[int, Counter]:
        async with _ceiling_refusals(context, _APPROVE_FIELDS), answering(context):
            return await self.limiter.decide_checkpoint(
                checkpoint,
                approve=approve,
                add=add,
                deadline_s=caller_time(context, self.deadline_margin_s),
                audit=audit,
            )

    async def approve(
        self, request: admin.ApproveCheckpointRequest, context: Context, identity: Identity
    ) -> admin.ApproveCheckpointResponse:
        checkpoint, tenant_id = await self._checkpoint_owner(request, context)
        async with answering(context):
            add = Amount(
                _amount(request.add_tokens, "add_tokens", MAX_LIMIT_TOKENS),
                _amount(request.add_usd_micros, "add_usd_micros", MAX_LIMIT_USD),
            )
        rpc = "ApproveCheckpoint"
        await self._authorise(context, rpc, identity, tenant_id, request)
        audit = self._audit(context, rpc, identity, tenant_id, request)
        outcome, counter = await self._decide(checkpoint, context, approve=True, add=add, audit=audit)
        return admin.ApproveCheckpointResponse(outcome=outcome, task=_task_state(counter))  # type: ignore[arg-type]

    async def deny(
        self, request: admin.DenyCheckpointRequest, context: Context, identity: Identity
    ) -> admin.DenyCheckpointResponse:
        checkpoint, tenant_id = await self._checkpoint_owner(request, context)
        rpc = "DenyCheckpoint"
        await self._authorise(context, rpc, identity, tenant_id, request)
        audit = self._audit(context, rpc, identity, tenant_id, request)
        outcome, _ = await self._decide(checkpoint, context, approve=False, add=Amount(0), audit=audit)
        return admin.DenyCheckpointResponse(outcome=outcome)  # type: ignore[arg-type]

    async def set_ceiling(
        self, request: admin.SetTaskCeilingRequest, context: Context, identity: Identity
    ) -> admin.SetTaskCeilingResponse:
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
        rpc = "SetTaskCeiling"
        await self._authorise(context, rpc, identity, tenant_id, request)
        async with _ceiling_refusals(context, _CEILING_FIELDS), answering(context):
            change = await self.limiter.set_ceiling(
                tenant_id,
                task_id,
                add=add,
                tokens=tokens,
                usd=usd,
                request_id=callers_id or f"bw-{uuid.uuid4().hex}",
                deadline_s=caller_time(context, self.deadline_margin_s),
                audit=self._audit(context, rpc, identity, tenant_id, request),
            )
        # Our own id seen again is this call's own resend: for the caller, the change was made now.
        replayed = change.replayed and bool(callers_id)
        return admin.SetTaskCeilingResponse(task=_task_state(change.task), replayed=replayed)

    async def reset_task(
        self, request: admin.ResetTaskRequest, context: Context, identity: Identity
    ) -> admin.ResetTaskResponse:
        async with answering(context):
            tenant_id, task_id = ident(request.tenant_id, "tenant_id"), ident(request.task_id, "task_id")
        rpc = "ResetTask"
        await self._authorise(context, rpc, identity, tenant_id, request)
        async with answering(context):
            existed = await self.limiter.reset_task(
                tenant_id,
                task_id,
                caller_time(context, self.deadline_margin_s),
                audit=self._audit(context, rpc, identity, tenant_id, request),
            )
        return admin.ResetTaskResponse(existed=existed)

    async def tenant_windows(
        self, request: admin.GetTenantWindowsRequest, context: Context, identity: Identity
    ) -> admin.GetTenantWindowsResponse:
        async with answering(context):
            tenant_id = ident(request.tenant_id, "tenant_id")
        await self._authorise(context, "GetTenantWindows", identity, tenant_id, request)
        async with answering(context):
            view = await self.limiter.budget(tenant_id, "", "", caller_time(context, self.deadline_margin_s))
        return admin.GetTenantWindowsResponse(scopes=[scope_state(s, c) for s, c in view.scopes])

    async def list_checkpoints(
        self, request: admin.ListCheckpointsRequest, context: Context, identity: Identity
    ) -> admin.ListCheckpointsResponse:
        async with answering(context):
            tenant_id = ident(request.tenant_id, "tenant_id")
            if request.filter not in (
                admin.CHECKPOINT_FILTER_UNSPECIFIED,
                admin.CHECKPOINT_FILTER_OPEN,
                admin.CHECKPOINT_FILTER_DECIDED,
            ):
                raise InvalidRequestError("filter", f"is not a CheckpointFilter (got {request.filter})")
            if request.page_size < 0:
                raise InvalidRequestError("page_size", f"must not be negative (got {request.page_size})")
            decided = request.filter == admin.CHECKPOINT_FILTER_DECIDED
            page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
            after = _read_page_token(request.page_token, tenant_id, decided)
        await self._authorise(context, "ListCheckpoints", identity, tenant_id, request)
        async with answering(context):
            page = await self.limiter.list_checkpoints(
                tenant_id,
                decided=decided,
                page_size=page_size,
                after=after,
                deadline_s=caller_time(context, self.deadline_margin_s),
            )
        response = admin.ListCheckpointsResponse(checkpoints=[_summary(record) for record in page.checkpoints])
        if page.next is not None:
            response.next_page_token = _page_token(tenant_id, decided, page.next)
        return response

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            ADMIN_SERVICE_NAME,
            {
                "ApproveCheckpoint": self._handler(
                    "ApproveCheckpoint", self.approve, admin.ApproveCheckpointRequest, admin.ApproveCheckpointResponse
                ),
                "DenyCheckpoint": self._handler(
                    "DenyCheckpoint", self.deny, admin.DenyCheckpointRequest, admin.DenyCheckpointResponse
                ),
                "SetTaskCeiling": self._handler(
                    "SetTaskCeiling", self.set_ceiling, admin.SetTaskCeilingRequest, admin.SetTaskCeilingResponse
                ),
                "ResetTask": self._handler(
                    "ResetTask", self.reset_task, admin.ResetTaskRequest, admin.ResetTaskResponse
                ),
                "GetTenantWindows": self._handler(
                    "GetTenantWindows",
                    self.tenant_windows,
                    admin.GetTenantWindowsRequest,
                    admin.GetTenantWindowsResponse,
                ),
                "ListCheckpoints": self._handler(
                    "ListCheckpoints",
                    self.list_checkpoints,
                    admin.ListCheckpointsRequest,
                    admin.ListCheckpointsResponse,
                ),
            },
        )
