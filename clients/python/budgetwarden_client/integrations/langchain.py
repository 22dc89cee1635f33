"""Budgets for LangChain v1 agents (``create_agent``) and the LangGraph graph they run on.

::

    from langchain.agents import create_agent
    from langgraph.checkpoint.memory import InMemorySaver
    from budgetwarden_client import Budget
    from budgetwarden_client.integrations.langchain import BudgetMiddleware

    agent = create_agent(model, tools, middleware=[BudgetMiddleware(Budget())], checkpointer=InMemorySaver())
    agent.invoke({"messages": [...]}, {"configurable": {"thread_id": "task-42"}})

One hook, ``wrap_model_call`` (``awrap_model_call`` under ``ainvoke``/``astream``), because it is the one that sees
the request before the model runs (to check it, swap the model, cap its output and trim its context, or refuse it)
and the ``AIMessage`` after (to report its ``usage_metadata``). CHECKPOINT becomes a LangGraph ``interrupt``: with a
checkpointer the graph pauses, an operator approves the checkpoint, ``Command(resume=...)`` re-runs the model node,
and the step is checked again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, ExitStack
from typing import Any

from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ModelResponse
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, convert_to_openai_messages
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.config import get_config
from langgraph.types import interrupt

from budgetwarden_client import AsyncBudget, Budget, CheckpointRequired, Step, pb

__all__ = ["CHECKPOINT_INTERRUPT", "BudgetMiddleware"]

CHECKPOINT_INTERRUPT = "budgetwarden.checkpoint"
"""The ``type`` of the interrupt value a CHECKPOINT raises (the value is a dict, see ``BudgetMiddleware``)."""

Request = ModelRequest[Any]
IdOf = Callable[[Request], str]


def thread_id(request: Request) -> str:
    """The default task id: the LangGraph thread (one conversation, one task)."""
    configurable = get_config().get("configurable") or {}
    thread = configurable.get("thread_id")
    if thread is None:
        raise ValueError("BudgetMiddleware: no task id: run the agent with a thread_id or pass task_id=")
    return str(thread)


def model_call_number(request: Request) -> str:
    """The default step id: ``model-N`` for the thread's N-th model call. It is counted from the graph state, so a node
    re-run on resume checks the same step again."""
    state_messages = request.state.get("messages") or request.messages
    calls = sum(1 for message in state_messages if isinstance(message, AIMessage))
    return f"model-{calls + 1}"


def model_name(model: BaseChatModel) -> str:
    """The model's name as the policy prices it (``ChatOpenAI.model_name``, or a ``model`` field)."""
    for field in ("model_name", "model"):
        name = getattr(model, field, None)
        if isinstance(name, str) and name:
            return name
    return ""


def renamed(model: BaseChatModel, name: str) -> BaseChatModel:
    """A copy of ``model`` calling ``name`` instead (same client, base URL, key and settings)."""
    for field in ("model_name", "model"):
        if field in type(model).model_fields:
            return model.model_copy(update={field: name})
    raise TypeError(
        f"BudgetMiddleware cannot rename a {type(model).__name__} to {name!r}: pass models={{{name!r}: <model>}}"
    )


def with_stream_usage(model: BaseChatModel) -> BaseChatModel:
    """``model``, asking for usage when it streams if it has a ``stream_usage`` setting left unset (``ChatOpenAI``
    leaves it off for a base URL of its own: a streamed run would report no usage and be charged its reservation)."""
    if "stream_usage" in type(model).model_fields and getattr(model, "stream_usage", None) is None:
        return model.model_copy(update={"stream_usage": True})
    return model


def _max_output_tokens(request: Request) -> int:
    for cap in (request.model_settings.get("max_tokens"), getattr(request.model, "max_tokens", None)):
        if isinstance(cap, int) and cap > 0:
            return cap
    return 0


def _openai_messages(request: Request) -> list[dict[str, Any]]:
    """The request's messages (system first) as OpenAI chat messages, one per LangChain message, in order."""
    messages: list[BaseMessage] = [request.system_message] if request.system_message is not None else []
    messages.extend(request.messages)
    return [convert_to_openai_messages(message) for message in messages]


def _openai_tools(request: Request) -> list[dict[str, Any]]:
    return [convert_to_openai_tool(tool) for tool in request.tools]


def _record(step: Step, response: ModelResponse[Any]) -> None:
    """Tells the step what the model spent, from the AIMessages' ``usage_metadata``. LangChain's ``output_tokens`` is
    the sum of every output type, reasoning (``output_token_details.reasoning``) included, so it is charged once."""
    for message in response.result:
        if not isinstance(message, AIMessage) or message.usage_metadata is None:
            continue
        usage = message.usage_metadata
        cached = usage.get("input_token_details", {}).get("cache_read", 0) or 0
        step.record_usage(
            input_tokens=usage["input_tokens"],
            output_tokens=usage["output_tokens"],
            cached_input_tokens=cached,
            tool_calls=len(message.tool_calls),
            model=step.model,
        )


def _checkpoint_value(stop: CheckpointRequired, task_id: str, step_id: str) -> dict[str, Any]:
    return {
        "type": CHECKPOINT_INTERRUPT,
        "checkpoint_id": stop.checkpoint_id,
        "task_id": task_id,
        "step_id": step_id,
        "message": stop.message,
        "remaining_tokens": stop.remaining_tokens,
    }


class BudgetMiddleware(AgentMiddleware[AgentState[Any], Any, Any]):
    """Checks every model call of an agent against the budget sidecar and reports what it spent.

    - ALLOW: the call runs as asked.
    - DEGRADE: the call runs on the advised model (``models[name]`` or, by default, a copy of the agent's model with
      its name changed), with the advised output cap (``model_settings["max_tokens"]``) and the context trimmed to the
      advised size (``Step.trim``; the system message is kept; the graph state is not changed).
    - CHECKPOINT: ``langgraph.types.interrupt`` with ``{"type": CHECKPOINT_INTERRUPT, "checkpoint_id", "task_id",
      "step_id", "message", "remaining_tokens"}``. The graph needs a checkpointer to pause; resume it with
      ``Command(resume=...)`` (the value is not used) once the checkpoint is approved: the step is checked again, and
      interrupts again if it still may not run.
    - DENY: ``BudgetDenied`` (``reason``, ``retry_after``, ``remaining_tokens``) propagates out of the agent; a sidecar
      that cannot be reached gives the Budget's fail mode (``BudgetUnavailable`` when closed).

    After the call its ``usage_metadata`` (input, output, cached ``input_token_details.cache_read``; reasoning is
    inside ``output_tokens``) is reported through the Budget's background reporter; a call that fails before any
    usage releases its reservation.

    ``budget``: a ``Budget`` for ``invoke``/``stream``, an ``AsyncBudget`` for ``ainvoke``/``astream``.
    ``task_id``: a fixed id or a function of the request (default: the graph's ``thread_id``). ``step_id``: a function
    of the request (default: ``model-N``, N counted from the graph state, stable across a resume).
    """

    def __init__(
        self,
        budget: Budget | AsyncBudget,
        *,
        task_id: str | IdOf | None = None,
        step_id: IdOf | None = None,
        models: Mapping[str, BaseChatModel] | None = None,
        labels: Mapping[str, str] | None = None,
        task_type: str | None = None,
    ) -> None:
        super().__init__()
        self.budget = budget
        self._task_id: IdOf = (lambda _: task_id) if isinstance(task_id, str) else (task_id or thread_id)
        self._step_id: IdOf = step_id or model_call_number
        self.models = dict(models or {})
        self.labels = dict(labels or {})
        self.task_type = task_type

    def _step_arguments(self, request: Request) -> tuple[str, str, dict[str, Any]]:
        task_id, step_id = self._task_id(request), self._step_id(request)
        arguments: dict[str, Any] = {
            "model": model_name(request.model),
            "messages": _openai_messages(request),  # counted by the sidecar with the model's encoding
            "tools": _openai_tools(request) or None,
            "max_output_tokens": _max_output_tokens(request),
            "labels": self.labels,
            "task_type": self.task_type,
        }
        return task_id, step_id, arguments

    def _applied(self, step: Step, request: Request) -> Request:
        """The request as the step's advice changes it, its model asked for the usage of a stream."""
        if step.decision != pb.DECISION_DEGRADE:
            return request.override(model=with_stream_usage(request.model))
        model = request.model
        if step.model and step.model != model_name(model):
            model = self.models.get(step.model) or renamed(model, step.model)
        settings = dict(request.model_settings)
        if step.max_tokens:
            settings["max_tokens"] = step.max_tokens
        messages = self._trimmed(step, request)
        return request.override(model=with_stream_usage(model), model_settings=settings, messages=messages)

    @staticmethod
    def _trimmed(step: Step, request: Request) -> list[AnyMessage]:
        if step.max_context_tokens is None:
            return list(request.messages)
        converted = [convert_to_openai_messages(message) for message in request.messages]
        system = [convert_to_openai_messages(request.system_message)] if request.system_message is not None else []
        kept = {id(message) for message in step.trim(system + converted)}
        return [
            message for message, as_openai in zip(request.messages, converted, strict=True) if id(as_openai) in kept
        ]

    def wrap_model_call(self, request: Request, handler: Callable[[Request], ModelResponse[Any]]) -> ModelResponse[Any]:
        budget = self.budget
        if not isinstance(budget, Budget):
            raise TypeError("BudgetMiddleware: invoke/stream need a Budget (an AsyncBudget is for ainvoke/astream)")
        task_id, step_id, arguments = self._step_arguments(request)
        while True:
            with ExitStack() as stack:
                try:
                    step = stack.enter_context(budget.step(task_id, step_id, **arguments))
                except CheckpointRequired as stop:
                    interrupt(_checkpoint_value(stop, task_id, step_id))  # returns once resumed: check again
                    continue
                response = handler(self._applied(step, request))
                _record(step, response)
                return response

    async def awrap_model_call(
        self, request: Request, handler: Callable[[Request], Awaitable[ModelResponse[Any]]]
    ) -> ModelResponse[Any]:
        budget = self.budget
        if not isinstance(budget, AsyncBudget):
            raise TypeError("BudgetMiddleware: ainvoke/astream need an AsyncBudget (a Budget is for invoke/stream)")
        task_id, step_id, arguments = self._step_arguments(request)
        while True:
            async with AsyncExitStack() as stack:
                try:
                    step = await stack.enter_async_context(budget.step(task_id, step_id, **arguments))
                except CheckpointRequired as stop:
                    interrupt(_checkpoint_value(stop, task_id, step_id))
                    continue
                response = await handler(self._applied(step, request))
                _record(step, response)
                return response
