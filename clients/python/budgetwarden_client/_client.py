from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from budgetwarden_api.v1 import admin_pb2 as admin_pb
from budgetwarden_api.v1 import admin_pb2_grpc as admin_grpc
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_api.v1 import budget_pb2_grpc as pb_grpc
from budgetwarden_client._channels import ClientTls, bearer_metadata, open_aio_channel, open_channel
from budgetwarden_client._messages import Message
from budgetwarden_client._stream import (
    CheckRefusedError,
    CheckSpec,
    CheckStream,
    answers,
    check_request,
    stream_request,
)

P = ParamSpec("P")
Answer = TypeVar("Answer")

DEFAULT_ADDR = "127.0.0.1:50151"
DEFAULT_ADMIN_ADDR = "127.0.0.1:50152"

# Retried by the channel itself, within the call's deadline: UNAVAILABLE only (the sidecar is starting, restarting, or
# its connection broke). Check is idempotent per step and Report per idempotency key, so a retry never charges twice.
RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "budgetwarden.v1.BudgetService"}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def default_addr() -> str:
    """Where the sidecar is: ``BUDGETWARDEN_ADDR`` (set by the Kubernetes injector) or the default loopback port."""
    return os.environ.get("BUDGETWARDEN_ADDR", DEFAULT_ADDR)


def default_tenant() -> str | None:
    """Who pays: ``BUDGETWARDEN_TENANT`` (set by the Kubernetes injector), or None."""
    return os.environ.get("BUDGETWARDEN_TENANT") or None


def channel_options(*, retry_unavailable: bool) -> list[tuple[str, Any]]:
    if not retry_unavailable:
        return []
    return [("grpc.enable_retries", 1), ("grpc.service_config", RETRY_SERVICE_CONFIG)]


def build_check(
    *,
    tenant_id: str = "",
    task_id: str = "",
    step_id: str = "",
    task_type: str = "",
    model: str = "",
    estimated_input_tokens: int | None = None,
    prompt_text: str | None = None,
    prompt_messages: pb.ChatPrompt | Sequence[Message] | None = None,
    messages: Sequence[Message] | None = None,
    tools: Sequence[Any] | None = None,
    max_output_tokens: int = 0,
    planned_tool_calls: int = 0,
    labels: Mapping[str, str] | None = None,
    lease_seconds: int | None = None,
    task_ceiling_tokens: int | None = None,
) -> pb.CheckRequest:
    """Checks one step. Give the input as one of ``estimated_input_tokens``, ``prompt_text``, or ``messages``
    (OpenAI-format chat messages, with ``tools`` schemas; or ``prompt_messages``, a ``pb.ChatPrompt`` or such a
    list)."""
    fields: dict[str, Any] = {
        "tenant_id": tenant_id,
        "task_id": task_id,
        "step_id": step_id,
        "task_type": task_type,
        "model": model,
        "estimated_input_tokens": estimated_input_tokens,
        "prompt_text": prompt_text,
        "prompt_messages": prompt_messages,
        "messages": messages,
        "tools": tools,
        "max_output_tokens": max_output_tokens,
        "planned_tool_calls": planned_tool_calls,
        "labels": labels,
        "lease_seconds": lease_seconds,
        "task_ceiling_tokens": task_ceiling_tokens,
    }
    return check_request(**{name: value for name, value in fields.items() if value is not None})


def build_report(records: Iterable[pb.UsageRecord]) -> pb.ReportRequest:
    """Reports usage records (at most 1000; the ``BackgroundReporter`` batches and retries them for you)."""
    return pb.ReportRequest(records=list(records))


def build_release(
    *, tenant_id: str = "", reservation_id: str = "", task_id: str = "", step_id: str = ""
) -> pb.ReleaseRequest:
    """Hands back a reservation: by ``reservation_id``, or by ``task_id`` and ``step_id``."""
    return pb.ReleaseRequest(tenant_id=tenant_id, reservation_id=reservation_id, task_id=task_id, step_id=step_id)


def build_get_budget(*, tenant_id: str = "", task_id: str = "", task_type: str = "") -> pb.GetBudgetRequest:
    """The state of a task's scopes and the tenant's windows."""
    return pb.GetBudgetRequest(tenant_id=tenant_id, task_id=task_id, task_type=task_type)


# The unary calls, written once for both clients: the request is built by one of the functions above (its typed
# keyword arguments are the method's, so mypy checks a call as it checks the function), the stub sends it.


def _blocking(
    build: Callable[P, Any], rpc: str, _answer: type[Answer]
) -> Callable[Concatenate[BudgetClient, P], Answer]:
    def call(self: BudgetClient, /, *args: P.args, **kwargs: P.kwargs) -> Answer:
        answer: Answer = getattr(self._stub, rpc)(build(*args, **kwargs), timeout=self.timeout)
        return answer

    call.__doc__ = build.__doc__
    return call


def _awaited(
    build: Callable[P, Any], rpc: str, _answer: type[Answer]
) -> Callable[Concatenate[AsyncBudgetClient, P], Awaitable[Answer]]:
    async def call(self: AsyncBudgetClient, /, *args: P.args, **kwargs: P.kwargs) -> Answer:
        answer: Answer = await getattr(self._stub, rpc)(build(*args, **kwargs), timeout=self.timeout)
        return answer

    call.__doc__ = build.__doc__
    return call


class BudgetClient:
    """A blocking client. Every method takes the request fields as keyword arguments and returns the response."""

    def __init__(
        self,
        addr: str | None = None,
        *,
        timeout: float = 5.0,
        retry_unavailable: bool = False,
        tls: ClientTls | None = None,
    ) -> None:
        """``retry_unavailable``: the channel retries UNAVAILABLE within each call's deadline (RETRY_SERVICE_CONFIG).
        ``tls``: for a sidecar that serves TLS; unset: ``ClientTls.from_env()``, else plaintext."""
        self.addr = addr or default_addr()
        self.timeout = timeout
        options = channel_options(retry_unavailable=retry_unavailable)
        self._channel = open_channel(self.addr, tls=tls or ClientTls.from_env(), options=options)
        self._stub = pb_grpc.BudgetServiceStub(self._channel)

    check = _blocking(build_check, "Check", pb.CheckResponse)
    report = _blocking(build_report, "Report", pb.ReportResponse)
    release = _blocking(build_release, "Release", pb.ReleaseResponse)
    get_budget = _blocking(build_get_budget, "GetBudget", pb.GetBudgetResponse)

    def check_many(self, checks: Iterable[CheckSpec]) -> list[pb.CheckResponse | CheckRefusedError]:
        """Many checks in one CheckStream message (at most 1000), decided in order; a refused check is returned as a
        CheckRefusedError in its place, the others go on."""
        (response,) = self._stub.CheckStream(iter([stream_request(checks)]), timeout=self.timeout)
        return answers(response)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> BudgetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncBudgetClient:
    """The asyncio twin of :class:`BudgetClient`."""

    def __init__(
        self,
        addr: str | None = None,
        *,
        timeout: float = 5.0,
        retry_unavailable: bool = False,
        tls: ClientTls | None = None,
    ) -> None:
        self.addr = addr or default_addr()
        self.timeout = timeout
        options = channel_options(retry_unavailable=retry_unavailable)
        self._channel = open_aio_channel(self.addr, tls=tls or ClientTls.from_env(), options=options)
        self._stub = pb_grpc.BudgetServiceStub(self._channel)

    check = _awaited(build_check, "Check", pb.CheckResponse)
    report = _awaited(build_report, "Report", pb.ReportResponse)
    release = _awaited(build_release, "Release", pb.ReleaseResponse)
    get_budget = _awaited(build_get_budget, "GetBudget", pb.GetBudgetResponse)

    async def check_many(self, checks: Iterable[CheckSpec]) -> list[pb.CheckResponse | CheckRefusedError]:
        """Many checks in one CheckStream message (at most 1000); see ``BudgetClient.check_many``."""
        call = self._stub.CheckStream(timeout=self.timeout)
        await call.write(stream_request(checks))
        await call.done_writing()
        response = await call.read()
        assert isinstance(response, pb.CheckStreamResponse), "the sidecar ended the stream without an answer"
        return answers(response)

    def check_stream(self) -> CheckStream:
        """A CheckStream kept open, for checking at a high rate: ``async with client.check_stream() as stream:``
        then ``await stream.check_many([...])`` as often as needed, also concurrently (each call times out after the
        client's timeout)."""
        return CheckStream(self._stub, timeout=self.timeout)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncBudgetClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class AdminClient:
    """A blocking client for BudgetAdminService (``BUDGETWARDEN_ADMIN_ADDR`` or 127.0.0.1:50152): the control plane,
    or a local sidecar's admin listener. ``token``: the bearer token (unset: ``BUDGETWARDEN_ADMIN_TOKEN``); ``tls``:
    for a listener that serves TLS (unset: ``ClientTls.from_env()``, else plaintext)."""

    def __init__(
        self,
        addr: str | None = None,
        *,
        timeout: float = 5.0,
        token: str | None = None,
        tls: ClientTls | None = None,
    ) -> None:
        self.addr = addr or os.environ.get("BUDGETWARDEN_ADMIN_ADDR", DEFAULT_ADMIN_ADDR)
        self.timeout = timeout
        self._metadata = bearer_metadata(token)
        self._channel = open_channel(self.addr, tls=tls or ClientTls.from_env())
        self._stub = admin_grpc.BudgetAdminServiceStub(self._channel)

    def approve(
        self, checkpoint_id: str, *, add_tokens: int = 0, add_usd_micros: int = 0
    ) -> admin_pb.ApproveCheckpointResponse:
        request = admin_pb.ApproveCheckpointRequest(
            checkpoint_id=checkpoint_id, add_tokens=add_tokens, add_usd_micros=add_usd_micros
        )
        return self._stub.ApproveCheckpoint(request, timeout=self.timeout, metadata=self._metadata)

    def deny(self, checkpoint_id: str) -> admin_pb.DenyCheckpointResponse:
        return self._stub.DenyCheckpoint(
            admin_pb.DenyCheckpointRequest(checkpoint_id=checkpoint_id), timeout=self.timeout, metadata=self._metadata
        )

    def set_ceiling(self, **fields: Any) -> admin_pb.SetTaskCeilingResponse:
        return self._stub.SetTaskCeiling(
            admin_pb.SetTaskCeilingRequest(**fields), timeout=self.timeout, metadata=self._metadata
        )

    def reset_task(self, tenant_id: str, task_id: str) -> admin_pb.ResetTaskResponse:
        request = admin_pb.ResetTaskRequest(tenant_id=tenant_id, task_id=task_id)
        return self._stub.ResetTask(request, timeout=self.timeout, metadata=self._metadata)

    def list_checkpoints(
        self, tenant_id: str, *, decided: bool = False, page_size: int = 0, page_token: str = ""
    ) -> admin_pb.ListCheckpointsResponse:
        """One page of a tenant's open (or ``decided``) checkpoints; go on with ``next_page_token`` while it is set."""
        request = admin_pb.ListCheckpointsRequest(
            tenant_id=tenant_id,
            filter=admin_pb.CHECKPOINT_FILTER_DECIDED if decided else admin_pb.CHECKPOINT_FILTER_OPEN,
            page_size=page_size,
            page_token=page_token,
        )
        return self._stub.ListCheckpoints(request, timeout=self.timeout, metadata=self._metadata)

    def tenant_windows(self, tenant_id: str) -> admin_pb.GetTenantWindowsResponse:
        request = admin_pb.GetTenantWindowsRequest(tenant_id=tenant_id)
        return self._stub.GetTenantWindows(request, timeout=self.timeout, metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
