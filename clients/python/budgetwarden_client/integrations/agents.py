"""Budgets for the OpenAI Agents SDK (``pip install "budgetwarden-client[agents]"``): a ``Model`` wrapper.

::

    from agents import Agent, RunConfig, Runner
    from budgetwarden_client import AsyncBudget
    from budgetwarden_client.integrations.agents import BudgetModelProvider

    async with AsyncBudget() as budget:
        provider = BudgetModelProvider(budget, task_id="task-42")  # wraps OpenAIProvider() by default
        result = await Runner.run(agent, "...", run_config=RunConfig(model_provider=provider))

Every LLM call of the run is one step (``llm-1``, ``llm-2``, ...): checked before the call (CHECKPOINT and DENY raise
``CheckpointRequired`` / ``BudgetDenied`` out of ``Runner.run``, before any request is sent), called with the DEGRADE
advice applied (its model, resolved by name through the wrapped provider; its output cap; the input items trimmed to
its context cap; its tool-call cap through ``tool_choice`` / ``parallel_tool_calls``, the calls past it taken out of
the response) and reported from the response's ``usage`` (cached input tokens and tool calls included; reasoning
tokens are part of ``output_tokens``).

Why a model wrapper and not ``RunHooks``: the runner resolves the model and its settings *before* it calls
``on_llm_start`` (``get_new_response`` in ``agents/run_internal/run_loop.py``), so a hook can refuse a call but not
swap the model or cap ``max_tokens`` on DEGRADE; and ``on_llm_end`` is not called when the call fails, which would
leave the reservation held until its lease lapses. A ``Model`` wraps the call itself: it can do all three.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from agents import (
    FunctionTool,
    Handoff,
    Model,
    ModelProvider,
    ModelResponse,
    ModelRetryAdvice,
    ModelRetryAdviceRequest,
    ModelSettings,
    ModelTracing,
    Tool,
)
from agents.agent_output import AgentOutputSchemaBase
from agents.exceptions import UserError
from agents.items import TResponseInputItem, TResponseOutputItem, TResponseStreamEvent
from agents.models.chatcmpl_converter import Converter
from agents.models.openai_provider import OpenAIProvider
from agents.usage import Usage
from openai.types.responses import ResponseCompletedEvent, ResponseOutputItemDoneEvent, ResponseUsage
from openai.types.responses.response_prompt_param import ResponsePromptParam

from budgetwarden_client._budget import AsyncBudget, AsyncStepScope
from budgetwarden_client._step import Step

__all__ = ["BudgetModelProvider", "BudgetedModel"]


class _StepIds:
    """``llm-1``, ``llm-2``, ...: one step id per LLM call, shared by the models of one provider (one task)."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._numbers = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._numbers)}"


class BudgetedModel(Model):
    """The model named ``model_name`` (resolved through ``provider``, default ``OpenAIProvider()``), each call checked
    as a step of ``task_id`` with ``budget`` and reported from its usage. Use it as an ``Agent``'s ``model`` or
    ``RunConfig.model``; ``BudgetModelProvider`` makes one for every model name of a run."""

    def __init__(
        self,
        model_name: str,
        *,
        budget: AsyncBudget,
        task_id: str,
        provider: ModelProvider | None = None,
        step_prefix: str = "llm",
        labels: dict[str, str] | None = None,
        planned_tool_calls: int | None = None,
        _step_ids: _StepIds | None = None,
    ) -> None:
        self.model_name = model_name
        self.budget = budget
        self.task_id = task_id
        self.provider = provider if provider is not None else OpenAIProvider()
        self.labels = dict(labels or {})
        self.planned_tool_calls = planned_tool_calls
        self._step_ids = _step_ids if _step_ids is not None else _StepIds(step_prefix)
        self._models: dict[str, Model] = {}

    def _model(self, name: str) -> Model:
        """The provider's model for ``name``, made once."""
        if name not in self._models:
            self._models[name] = self.provider.get_model(name or None)  # no name: the provider's default
        return self._models[name]

    def _step(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        handoffs: list[Handoff],
    ) -> AsyncStepScope:
        """The ``async with`` scope checking this call (its prompt in chat format, counted by the sidecar)."""
        messages, tool_schemas, prompt_text = _chat_prompt(system_instructions, input, tools, handoffs)
        spec_input: dict[str, Any] = {"prompt_text": prompt_text}
        if prompt_text is None:
            spec_input = {"messages": messages, "tools": tool_schemas or None}
        return self.budget.step(
            self.task_id,
            self._step_ids.next(),
            model=self.model_name,
            max_output_tokens=model_settings.max_tokens or 0,
            planned_tool_calls=self._planned_tool_calls(model_settings, tools, handoffs),
            labels=self.labels,
            **spec_input,
        )

    def _planned_tool_calls(self, model_settings: ModelSettings, tools: list[Tool], handoffs: list[Handoff]) -> int:
        """What the call may spend on tools, so that a DEGRADE can cap it: as given, else every tool offered called
        once (one at the most without parallel tool calls, none with ``tool_choice="none"``)."""
        if self.planned_tool_calls is not None:
            return self.planned_tool_calls
        offered = len(tools) + len(handoffs)
        if model_settings.tool_choice == "none":
            return 0
        return min(offered, 1) if model_settings.parallel_tool_calls is False else offered

    def _advised(
        self,
        step: Step,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
    ) -> tuple[Model, str | list[TResponseInputItem], ModelSettings]:
        """The model, input and settings to call: the DEGRADE advice applied (model, output cap, the input trimmed to
        its context, its tool-call cap through ``tool_choice`` / ``parallel_tool_calls``), else the ones asked for."""
        changes: dict[str, Any] = {}
        if step.max_tokens and step.max_tokens != model_settings.max_tokens:
            changes["max_tokens"] = step.max_tokens
        if step.max_tool_calls == 0:
            changes["tool_choice"] = "none"
        elif step.max_tool_calls == 1:
            changes["parallel_tool_calls"] = False
        if changes:
            model_settings = dataclasses.replace(model_settings, **changes)
        if step.max_context_tokens is not None and not isinstance(input, str):
            input = _trimmed(step, system_instructions, input)
        return self._model(step.model or self.model_name), input, model_settings

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        async with self._step(system_instructions, input, model_settings, tools, handoffs) as step:
            model, sent, settings = self._advised(step, system_instructions, input, model_settings)
            response = await model.get_response(
                system_instructions,
                sent,
                settings,
                tools,
                output_schema,
                handoffs,
                tracing,
                previous_response_id=previous_response_id,
                conversation_id=conversation_id,
                prompt=prompt,
            )
            if step.max_tool_calls is not None:
                response = dataclasses.replace(response, output=_cut_calls(response.output, step.max_tool_calls))
            _record(step, response.usage, response.output)
            return response

    async def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        if model_settings.include_usage is None:
            # The SDK asks for the usage of a chat completions stream only from api.openai.com: ask it of any.
            model_settings = dataclasses.replace(model_settings, include_usage=True)
        async with self._step(system_instructions, input, model_settings, tools, handoffs) as step:
            model, sent, settings = self._advised(step, system_instructions, input, model_settings)
            events = model.stream_response(
                system_instructions,
                sent,
                settings,
                tools,
                output_schema,
                handoffs,
                tracing,
                previous_response_id=previous_response_id,
                conversation_id=conversation_id,
                prompt=prompt,
            )
            calls_seen = 0
            try:
                async for event in events:
                    if step.max_tool_calls is not None and _is_call_done(event):
                        calls_seen += 1
                        if calls_seen > step.max_tool_calls:
                            continue  # a call past the cap: the runner never hears of it
                    if isinstance(event, ResponseCompletedEvent):
                        if step.max_tool_calls is not None:
                            output = _cut_calls(event.response.output, step.max_tool_calls)
                            event = event.model_copy(
                                update={"response": event.response.model_copy(update={"output": output})}
                            )
                        # The usage comes with the final event.
                        if event.response.usage is not None:
                            _record(step, _usage_of(event.response.usage), event.response.output)
                    yield event
            except GeneratorExit:
                # Closed by the consumer before the end: the request went out, so the step ends as completed and,
                # without the usage, is charged what it reserved (a failure would release it, spending for free).
                pass
            finally:
                await _aclose(events)

    def get_retry_advice(self, request: ModelRetryAdviceRequest) -> ModelRetryAdvice | None:
        return self._model(self.model_name).get_retry_advice(request)

    async def close(self) -> None:
        for model in self._models.values():
            await model.close()


class BudgetModelProvider(ModelProvider):
    """A ``ModelProvider`` whose every model is a ``BudgetedModel`` of ``task_id`` (one step per LLM call, numbered
    across the run's models): ``RunConfig(model_provider=BudgetModelProvider(budget, task_id=...))``. ``provider``
    resolves the names, the advised ones included (default ``OpenAIProvider()``). Agents whose ``model`` is a
    ``Model`` instance bypass providers: wrap those in ``BudgetedModel`` instead."""

    def __init__(
        self,
        budget: AsyncBudget,
        *,
        task_id: str,
        provider: ModelProvider | None = None,
        default_model: str = "",
        step_prefix: str = "llm",
        labels: dict[str, str] | None = None,
        planned_tool_calls: int | None = None,
    ) -> None:
        self.budget = budget
        self.task_id = task_id
        self.provider = provider if provider is not None else OpenAIProvider()
        self.default_model = default_model
        self.labels = dict(labels or {})
        self.planned_tool_calls = planned_tool_calls
        self._step_ids = _StepIds(step_prefix)

    def get_model(self, model_name: str | None) -> Model:
        return BudgetedModel(
            model_name or self.default_model,
            budget=self.budget,
            task_id=self.task_id,
            provider=self.provider,
            labels=self.labels,
            planned_tool_calls=self.planned_tool_calls,
            _step_ids=self._step_ids,
        )

    async def aclose(self) -> None:
        await self.provider.aclose()


def _chat_prompt(
    system_instructions: str | None,
    input: str | list[TResponseInputItem],
    tools: Sequence[Tool],
    handoffs: Sequence[Handoff],
) -> tuple[list[Any], list[Any], str | None]:
    """The call's prompt as OpenAI chat messages and tool schemas (the format the sidecar counts), converted by the
    SDK's own Responses-to-chat converter. Items it cannot convert (hosted tools' calls, ...) make the whole prompt
    plain text, its JSON: counted, if approximately."""
    schemas: list[Any] = [Converter.tool_to_openai(tool) for tool in tools if isinstance(tool, FunctionTool)]
    schemas += [Converter.convert_handoff_tool(handoff) for handoff in handoffs]
    system: list[Any] = [{"role": "system", "content": system_instructions}] if system_instructions else []
    try:
        return system + list(Converter.items_to_messages(input)), schemas, None
    except UserError:
        return [], [], "\n".join([system_instructions or "", json.dumps(input, default=str)])


async def _aclose(events: AsyncIterator[Any]) -> None:
    """Closes the wrapped model's stream now (its HTTP response with it) rather than when it is collected."""
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


def _usage_of(usage: ResponseUsage) -> Usage:
    return Usage(
        requests=1,
        input_tokens=usage.input_tokens,
        input_tokens_details=usage.input_tokens_details,
        output_tokens=usage.output_tokens,
        output_tokens_details=usage.output_tokens_details,
        total_tokens=usage.total_tokens,
    )


def _record(step: Step, usage: Usage, output: Sequence[TResponseOutputItem]) -> None:
    """The call's usage on the step. The SDK's ``output_tokens`` already include the reasoning tokens (as OpenAI's
    do), so they are not added again."""
    step.record_usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=usage.input_tokens_details.cached_tokens or 0,
        tool_calls=sum(1 for _ in _function_calls(output)),
    )


def _trimmed(step: Step, system_instructions: str | None, items: list[TResponseInputItem]) -> list[TResponseInputItem]:
    """The input items cut to the advice's context by ``step.trim_items``, each item standing as the chat message the
    SDK's converter makes of it alone (the instructions stay whole). Items the converter cannot take (hosted tools'
    calls, ...) leave the input as it is: sent whole, and reported as spent."""
    system: list[Any] = [{"role": "system", "content": system_instructions}] if system_instructions else []
    try:
        alone = [Converter.items_to_messages([item]) for item in items]
    except UserError:
        return items
    # An item with no message of its own (a reasoning item) stands as an empty one; one with several as the first.
    messages = system + [converted[0] if converted else {"role": "assistant", "content": ""} for converted in alone]
    return step.trim_items(items, messages)


def _is_call_done(event: Any) -> bool:
    return isinstance(event, ResponseOutputItemDoneEvent) and getattr(event.item, "type", None) == "function_call"


def _cut_calls(output: Sequence[TResponseOutputItem], limit: int) -> list[TResponseOutputItem]:
    """``output`` with its function calls past the first ``limit`` taken out: the runner runs only the calls the
    advice allows (the model was asked for no more through ``tool_choice`` / ``parallel_tool_calls`` where those can
    say it; this holds the cap where they cannot)."""
    kept: list[TResponseOutputItem] = []
    calls = 0
    for item in output:
        if getattr(item, "type", None) == "function_call":
            calls += 1
            if calls > limit:
                continue
        kept.append(item)
    return kept


def _function_calls(output: Sequence[TResponseOutputItem]) -> Iterator[TResponseOutputItem]:
    return (item for item in output if getattr(item, "type", None) == "function_call")
