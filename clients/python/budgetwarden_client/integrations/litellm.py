"""Budgets for LiteLLM: a ``CustomLogger`` that checks each call before it is sent and reports what it spent.

::

    import litellm
    from budgetwarden_client.integrations.litellm import BudgetwardenLogger

    litellm.callbacks = [BudgetwardenLogger()]  # BUDGETWARDEN_ADDR, BUDGETWARDEN_TENANT
    reply = await litellm.acompletion(
        model="openai/big", messages=messages, metadata={"budgetwarden_task_id": "task-42"}
    )

Which hooks run where (read in LiteLLM 1.110's source):

- The SDK (``litellm.acompletion``) never calls ``async_pre_call_hook``: it is the proxy's. The SDK's async wrapper
  calls ``async_pre_call_deployment_hook`` just before the request is sent; it may raise (the call is refused) and
  its returned kwargs replace the request (model, max tokens, messages). The sync ``litellm.completion`` calls no hook
  that can refuse or rewrite (its only pre-call callback, ``log_pre_api_call``, has its exceptions caught and logged):
  sync calls are budgeted by wrapping the function, ``budgeted_completion(Budget())``.
- The proxy calls ``async_pre_call_hook`` with the request body (the model is a model group name there), then routes
  it through the same SDK wrapper, whose ``async_pre_call_deployment_hook`` sees the call already checked (by its
  ``litellm_call_id``) and leaves it alone.
- Both call ``async_log_success_event`` (usage: the response's, or a stream's assembled response) and
  ``async_log_failure_event`` (the reservation is released) on the caller's event loop.

CHECKPOINT and DENY raise ``CheckpointRequired`` / ``BudgetDenied`` out of the hook (the SDK call raises them as they
are; the proxy answers the request with an error). DEGRADE rewrites the model (keeping the provider prefix:
``openai/big`` becomes ``openai/small``), caps ``max_tokens`` / ``max_completion_tokens`` and trims the messages to the
advised context.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import litellm
from litellm.integrations.custom_logger import CustomLogger

from budgetwarden_client._budget import AsyncBudget, AsyncStepScope, Budget
from budgetwarden_client._errors import BudgetDenied, BudgetError, CheckpointRequired
from budgetwarden_client._step import FailMode, Step
from budgetwarden_client._usage import BudgetedStream, exc_info, get, record_usage

__all__ = ["BudgetwardenLogger", "ProxyRefusalError", "StepIds", "budgeted_completion", "step_ids_from_metadata"]

logger = logging.getLogger("budgetwarden_client.integrations.litellm")

StepIds = Callable[[Mapping[str, Any]], tuple[str, str]]
"""Gives a call's (task_id, step_id) from its request kwargs (or, on the proxy, its request body)."""

TASK_KEY = "budgetwarden_task_id"
STEP_KEY = "budgetwarden_step_id"
CAP_KEYS = ("max_completion_tokens", "max_tokens")
CHAT_CALLS = frozenset({"completion", "acompletion"})  # the call types budgeted: chat completions


def _metadata(request: Mapping[str, Any]) -> Mapping[str, Any]:
    """The request's metadata: ``metadata=`` in the SDK; on the proxy the body's ``metadata`` (``litellm_metadata``
    on the routes that keep ``metadata`` for the provider)."""
    for key in ("metadata", "litellm_metadata"):
        value = request.get(key)
        if isinstance(value, Mapping) and (TASK_KEY in value or STEP_KEY in value):
            return value
    return {}


def step_ids_from_metadata(request: Mapping[str, Any]) -> tuple[str, str]:
    """The default ``step_ids``: ``metadata["budgetwarden_task_id"]`` and ``["budgetwarden_step_id"]``; without a
    step id the call's ``litellm_call_id``; without a task id the call is a task of its own (only the tenant's
    windows and the per-step cap then bound it)."""
    metadata = _metadata(request)
    call_id = str(request.get("litellm_call_id") or "")
    step_id = str(metadata.get(STEP_KEY) or call_id)
    task_id = str(metadata.get(TASK_KEY) or f"litellm-{call_id}")
    return task_id, step_id


def _split_provider(model: str) -> tuple[str, str]:
    """``openai/big`` as (``openai/``, ``big``): the budget knows models by their names, LiteLLM by provider too."""
    prefix, _, name = model.partition("/")
    if name and prefix in litellm.provider_list:
        return prefix + "/", name
    return "", model


def _output_cap(request: Mapping[str, Any]) -> int:
    for key in CAP_KEYS:
        value = request.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def _step_arguments(request: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The ``budget.step`` arguments of a chat completion request (its prompt counted by the sidecar)."""
    messages = request.get("messages")
    chat = isinstance(messages, list)
    return {
        "model": model,
        "messages": messages if chat else None,
        "tools": request.get("tools") if chat else None,
        "max_output_tokens": _output_cap(request),
    }


def budgeted_completion(budget: Budget, *, step_ids: StepIds = step_ids_from_metadata) -> Callable[..., Any]:
    """``litellm.completion`` under ``budget`` (the sync path has no LiteLLM hook that can refuse a call)::

        completion = budgeted_completion(Budget())
        reply = completion(model="openai/big", messages=messages, metadata={"budgetwarden_task_id": "task-42"})

    Takes ``litellm.completion``'s keyword arguments. The call is checked first (CHECKPOINT and DENY raise, nothing is
    sent), a DEGRADE's advice is applied as the logger applies it, and the response's usage is reported; a stream
    (asked for its usage chunk) is a ``BudgetedStream`` whose step ends when it does. A call that raises releases its
    reservation."""

    def completion(**kwargs: Any) -> Any:
        request = dict(kwargs)
        request.setdefault("litellm_call_id", str(uuid.uuid4()))  # the default step id, and LiteLLM's own call id
        prefix, model = _split_provider(str(request.get("model") or ""))
        task_id, step_id = step_ids(request)
        scope = budget.step(task_id, step_id, **_step_arguments(request, model))
        step = scope.__enter__()
        streams = bool(request.get("stream"))
        try:
            send = _apply(step, request, prefix)
            if streams:  # a stream sends its usage only when asked to
                send["stream_options"] = {**dict(send.get("stream_options") or {}), "include_usage": True}
            result = litellm.completion(**send)
        except BaseException as error:
            scope.__exit__(*exc_info(error))
            raise
        if streams:
            return BudgetedStream(result, step, scope)
        record_usage(step, get(result, "usage"))
        scope.__exit__(None, None, None)
        return result

    return completion


class BudgetwardenLogger(CustomLogger):
    """Checks every async LiteLLM call against the budget and reports its usage (see the module's docstring).

    ``budget``: the AsyncBudget to use (default: one made on first use, on the running event loop, from ``addr``,
    ``tenant_id``, ``timeout``, ``fail_mode`` and ``task_type``, as ``AsyncBudget`` reads them); ``step_ids``: how a
    call names its task and step (default ``step_ids_from_metadata``)."""

    def __init__(
        self,
        budget: AsyncBudget | None = None,
        *,
        addr: str | None = None,
        tenant_id: str | None = None,
        timeout: float | None = None,
        fail_mode: FailMode = "closed",
        task_type: str = "",
        step_ids: StepIds = step_ids_from_metadata,
    ) -> None:
        super().__init__()
        self._budget = budget
        self._budget_args: dict[str, Any] = {"tenant_id": tenant_id, "fail_mode": fail_mode, "task_type": task_type}
        if timeout is not None:
            self._budget_args["timeout"] = timeout
        self._addr = addr
        self._step_ids = step_ids
        self._open: dict[str, tuple[AsyncStepScope, Step]] = {}
        """The steps checked and not yet reported, by litellm_call_id."""
        # LiteLLM adds a logger to its success and failure lists only when no logger with the same class and public
        # str/int/bool attributes is there: without a key of its own, a second instance (another tenant, or one
        # replacing the first) would never hear of its calls' ends.
        self.callback_key = uuid.uuid4().hex

    @property
    def budget(self) -> AsyncBudget:
        # Made on first use: a grpc.aio channel belongs to the event loop it is first used on, and a proxy imports
        # its callbacks before its loop runs.
        if self._budget is None:
            self._budget = AsyncBudget(self._addr, **self._budget_args)
        return self._budget

    async def aclose(self) -> None:
        """Closes the budget (made here or given), delivering the usage still queued."""
        if self._budget is not None:
            await self._budget.close()

    async def _check(self, request: dict[str, Any], *, keep_provider: bool) -> dict[str, Any]:
        """Checks the call (CHECKPOINT and DENY raise) and returns the request with a DEGRADE's advice applied."""
        call_id = str(request.get("litellm_call_id") or "")
        if not call_id or call_id in self._open:  # already checked (the proxy's hook ran first), or not a call
            return request
        asked = str(request.get("model") or "")
        prefix, model = _split_provider(asked) if keep_provider else ("", asked)
        task_id, step_id = self._step_ids(request)
        scope = self.budget.step(task_id, step_id, **_step_arguments(request, model))
        step = await scope.__aenter__()
        self._open[call_id] = (scope, step)
        return _apply(step, request, prefix)

    async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> dict[str, Any] | None:
        """The SDK's hook (every async call, just before it is sent)."""
        if str(getattr(call_type, "value", call_type)) not in CHAT_CALLS:
            return None
        return await self._check(kwargs, keep_provider=True)

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: Any
    ) -> dict[str, Any] | None:
        """The proxy's hook (before routing: ``data["model"]`` is a model group, and so is a DEGRADE's model)."""
        if str(call_type) not in CHAT_CALLS:
            return None
        try:
            return await self._check(data, keep_provider=False)
        except BudgetError as refused:
            raise ProxyRefusalError(refused) from refused

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        checked = self._open.pop(str(kwargs.get("litellm_call_id") or ""), None)
        if checked is None:
            return
        scope, step = checked
        usage = get(kwargs.get("complete_streaming_response") or response_obj, "usage")
        if usage is not None:
            record_usage(step, usage, model=_split_provider(str(kwargs.get("model") or step.model))[1])
        await scope.__aexit__(None, None, None)  # without usage the step is charged its reservation

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        checked = self._open.pop(str(kwargs.get("litellm_call_id") or ""), None)
        if checked is None:
            return
        scope, _ = checked
        error = kwargs.get("exception")
        failure = error if isinstance(error, BaseException) else RuntimeError("the LiteLLM call failed")
        await scope.__aexit__(type(failure), failure, None)  # nothing spent: the reservation goes back


class ProxyRefusalError(Exception):
    """A refusal as the LiteLLM proxy answers it: the proxy answers an exception by its ``status_code`` (an exception
    without one is a 500), with its ``message``, ``code`` and ``provider_specific_fields`` in the error body. 429 for
    CHECKPOINT and DENY, 503 when the sidecar cannot be reached; ``provider_specific_fields["budgetwarden"]`` names
    the decision, the checkpoint id to approve, ``retry_after`` and the remaining tokens. The refusal is the
    ``__cause__``."""

    def __init__(self, refused: BudgetError) -> None:
        super().__init__(str(refused))
        self.message = str(refused)
        details: dict[str, Any] = {"decision": "unavailable"}
        self.status_code = 503
        if isinstance(refused, (CheckpointRequired, BudgetDenied)):
            self.status_code = 429
            details["decision"] = "checkpoint" if isinstance(refused, CheckpointRequired) else "deny"
            details["remaining_tokens"] = refused.remaining_tokens
        if isinstance(refused, CheckpointRequired):
            details["checkpoint_id"] = refused.checkpoint_id
        if isinstance(refused, BudgetDenied) and refused.retry_after:
            details["retry_after"] = refused.retry_after
        self.code = f"budgetwarden_{details['decision']}"
        self.provider_specific_fields = {"budgetwarden": details}


def _apply(step: Step, request: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The request with the step's model, output cap and trimmed messages (unchanged on ALLOW)."""
    if not step.advice.ByteSize():
        return request
    changed = dict(request)
    if step.advice.model:
        changed["model"] = prefix + step.model
    if step.max_tokens:
        keys = [key for key in CAP_KEYS if key in request] or ["max_tokens"]
        for key in keys:
            changed[key] = step.max_tokens
    messages = request.get("messages")
    if step.max_context_tokens is not None and isinstance(messages, list):
        changed["messages"] = step.trim(messages)
    return changed
