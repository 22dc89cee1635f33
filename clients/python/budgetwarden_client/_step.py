"""One agent step under a budget: what the sidecar decided, what to change on DEGRADE, what it really spent.

``Step`` is the state shared by ``Budget.step`` (``with``) and ``AsyncBudget.step`` (``async with``): the decision is
turned into a ``Step`` or a ``BudgetError`` here, and the way the step ended into a report or a release.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import grpc

from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client._errors import BudgetDenied, BudgetError, BudgetUnavailable, CheckpointRequired
from budgetwarden_client._messages import Message, as_dict, chat_message, chat_prompt, message_chars

FailMode = Literal["open", "closed"]
T = TypeVar("T")

# The sidecar could not be reached (or did not answer) within the deadline: the local fail mode decides.
# CANCELLED: the step API never cancels a call it waits for (a caller's own cancellation arrives as
# asyncio.CancelledError or KeyboardInterrupt), so a CANCELLED status is the server's: gRPC refusing a call beyond the
# sidecar's --max-pending-calls, or a sidecar stopping.
UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})
OVERLOADED = "overloaded:"  # how a sidecar's RESOURCE_EXHAUSTED starts when it sheds a check it had no room for
# trim()'s estimate when the check carried no prompt to calibrate on: about 4 characters per token, the usual rule
# for English text with the OpenAI encodings; and the chat format's few tokens per message.
CHARS_PER_TOKEN = 4.0
TOKENS_PER_MESSAGE = 4


@dataclass(frozen=True)
class StepSpec:
    """What a step asks for: the arguments of ``Budget.step`` (the input as one of the three ways)."""

    task_id: str
    step_id: str
    model: str = ""
    messages: Sequence[Message] | None = None
    tools: Sequence[Any] | None = None
    prompt_text: str | None = None
    estimated_input_tokens: int | None = None
    max_output_tokens: int = 0
    planned_tool_calls: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    lease_seconds: int | None = None
    task_ceiling_tokens: int | None = None
    task_type: str = ""

    def __post_init__(self) -> None:
        given = [self.messages is not None, self.prompt_text is not None, self.estimated_input_tokens is not None]
        if sum(given) > 1:
            raise ValueError("give the step's input as one of messages, prompt_text or estimated_input_tokens")
        if self.tools and self.messages is None:
            raise ValueError("tools are counted with messages: give messages too")

    def request_fields(self, tenant_id: str) -> tuple[dict[str, Any], bool]:
        """The keyword arguments of ``BudgetClient.check``, and whether the prompt holds stand-ins (see
        ``_messages``)."""
        fields: dict[str, Any] = {
            "tenant_id": tenant_id,
            "task_id": self.task_id,
            "step_id": self.step_id,
            "task_type": self.task_type,
            "model": self.model,
            "max_output_tokens": self.max_output_tokens,
            "planned_tool_calls": self.planned_tool_calls,
            "labels": self.labels,
            "lease_seconds": self.lease_seconds,
            "task_ceiling_tokens": self.task_ceiling_tokens,
        }
        approximate = False
        if self.messages is not None:
            converted = chat_prompt(self.messages, self.tools)
            fields["prompt_messages"] = converted.prompt
            approximate = converted.approximate
        elif self.prompt_text is not None:
            fields["prompt_text"] = self.prompt_text
        elif self.estimated_input_tokens is not None:
            fields["estimated_input_tokens"] = self.estimated_input_tokens
        return fields, approximate


def least_remaining(response: pb.CheckResponse) -> int | None:
    """The least remaining tokens of the task and the tenant windows that have a limit (None: none has). The step
    cap is left out: it bounds one request, it is not a budget that runs down."""
    left = [
        scope.remaining_tokens
        for scope in response.scopes
        if scope.HasField("remaining_tokens") and scope.kind != pb.SCOPE_KIND_STEP
    ]
    return min(left) if left else None


@dataclass
class _Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    tool_calls: int = 0
    model: str = ""


class Step:
    """A step that may run (ALLOW or DEGRADE, or the local fail mode's ALLOW). Apply the advice with ``model``,
    ``max_tokens`` and ``trim(messages)``; tell it what the step spent with ``record_usage``."""

    def __init__(
        self, spec: StepSpec, response: pb.CheckResponse, *, approximate: bool, from_fail_mode: bool = False
    ) -> None:
        self.task_id = spec.task_id
        self.step_id = spec.step_id
        self.response = response
        """The sidecar's answer (empty, apart from the decision, for a fail-open step)."""
        self.decision: pb.Decision.ValueType = response.decision
        self.from_fail_mode = from_fail_mode or response.from_fail_mode
        """True when no budget was checked: the sidecar could not be reached (or its store could not answer) and
        the fail mode let the step run."""
        advice = response.advice if response.decision == pb.DECISION_DEGRADE else pb.DegradeAdvice()
        self.advice = advice
        self.model: str = advice.model or spec.model
        """The model to call: the advice's on DEGRADE, else the one asked for."""
        self.max_tokens: int = advice.max_output_tokens or spec.max_output_tokens
        """The output cap to pass to the model: the advice's on DEGRADE, else the one asked for."""
        self.max_context_tokens: int | None = advice.max_context_tokens or None
        """The DEGRADE advice's context cap (None: none): apply it with ``trim``."""
        self.max_tool_calls: int | None = advice.max_tool_calls if advice.HasField("max_tool_calls") else None
        """The DEGRADE advice's cap on the step's tool calls (None: none); given only to a step that planned more
        (``planned_tool_calls``)."""
        self.approximate = approximate or response.token_count.approximate
        """True when the prompt's count is an estimate (stand-ins for images or tool schemas, or the sidecar's)."""
        self.reservation_id: str = response.reservation_id
        self.granted_tokens: int = response.granted_tokens
        self.cost_usd_micros: int = response.granted_cost_usd_micros
        """The cost reserved for the step, in micro-USD."""
        self.remaining_tokens: int | None = least_remaining(response)
        """The least remaining tokens of the task and tenant windows, this step's reservation held (None: unlimited)."""
        self.input_tokens: int = (
            response.token_count.input_tokens if response.HasField("token_count") else spec.estimated_input_tokens or 0
        )
        """The input tokens as the sidecar counted them (or as estimated by the caller)."""
        self._spec = spec
        self._usage: _Usage | None = None

    @property
    def usage_recorded(self) -> bool:
        return self._usage is not None

    def record_usage(
        self,
        *,
        input_tokens: int,
        output_tokens: int = 0,
        cached_input_tokens: int = 0,
        reasoning_tokens: int = 0,
        tool_calls: int = 0,
        model: str | None = None,
    ) -> None:
        """What the step spent; calls add up (a step that calls the model twice records both). ``reasoning_tokens``
        are charged as output (the proto has no field of their own): pass them only when ``output_tokens`` leaves
        them out (OpenAI's ``completion_tokens`` already includes them). ``model``: the one actually called, when
        not ``step.model``."""
        for name, value in (
            ("input_tokens", input_tokens),
            ("output_tokens", output_tokens),
            ("cached_input_tokens", cached_input_tokens),
            ("reasoning_tokens", reasoning_tokens),
            ("tool_calls", tool_calls),
        ):
            if value < 0:
                raise ValueError(f"{name} must not be negative")
        usage = self._usage or _Usage(model=self.model)
        usage.input_tokens += input_tokens
        usage.output_tokens += output_tokens + reasoning_tokens
        usage.cached_input_tokens += cached_input_tokens
        usage.tool_calls += tool_calls
        if model:
            usage.model = model
        self._usage = usage

    def trim(self, messages: Sequence[Message]) -> list[Message]:
        """``messages`` cut to the DEGRADE advice's ``max_context_tokens`` (unchanged without one): every system
        (and developer) message is kept, then the most recent others that fit, in their order; a tool result whose
        call was cut goes too. Tokens are estimated per message as 4 + its characters divided by the prompt's
        characters per token as the sidecar counted it at the check (4 characters per token without a count)."""
        if self.max_context_tokens is None:
            return list(messages)
        budget = self.max_context_tokens
        costs = [self._estimate(raw, index) for index, raw in enumerate(messages)]
        pinned = [i for i, raw in enumerate(messages) if _role(raw) in ("system", "developer")]
        budget -= sum(costs[i] for i in pinned)
        kept = set(pinned)
        for index in reversed(range(len(messages))):
            if index in kept:
                continue
            if costs[index] > budget:
                break
            budget -= costs[index]
            kept.add(index)
        recent = sorted(i for i in kept if i not in pinned)
        # A tool result must follow the assistant message that called it: results left without their call go too.
        while recent and _role(messages[recent[0]]) in ("tool", "function"):
            kept.discard(recent.pop(0))
        return [messages[i] for i in sorted(kept)]

    def trim_items(self, items: Sequence[T], messages: Sequence[Message]) -> list[T]:
        """``items`` cut as ``trim`` cuts ``messages``, which stand for them: the last ``len(items)`` messages are the
        items', one each, in order; the ones before (instructions, say) are counted but are no items."""
        kept = self.trim(messages)
        offset = len(messages) - len(items)
        wanted = iter(kept)
        next_kept = next(wanted, None)
        out: list[T] = []
        for index, message in enumerate(messages):
            if message is next_kept:  # trim keeps the messages themselves, in their order
                if index >= offset:
                    out.append(items[index - offset])
                next_kept = next(wanted, None)
        return out

    def _estimate(self, raw: Message, index: int) -> int:
        message, _ = chat_message(raw, index)
        return TOKENS_PER_MESSAGE + math.ceil(message_chars(message) / self._chars_per_token())

    def _chars_per_token(self) -> float:
        counted = self.response.token_count.input_tokens if self.response.HasField("token_count") else 0
        if counted <= 0 or self._spec.messages is None:
            return CHARS_PER_TOKEN
        converted = chat_prompt(self._spec.messages, self._spec.tools).prompt.messages
        chars = sum(message_chars(message) for message in converted)
        tokens = counted - TOKENS_PER_MESSAGE * len(converted)
        return chars / tokens if chars > 0 and tokens > 0 else CHARS_PER_TOKEN

    def usage_record(self, tenant_id: str, outcome: pb.Outcome.ValueType) -> pb.UsageRecord | None:
        """The record to report for the way the step ended (None: nothing to report). A step that completed without
        ``record_usage`` is charged what it reserved: spending nobody reported is never free."""
        if self._usage is None and outcome == pb.OUTCOME_COMPLETED and self.reservation_id:
            reserved_input = min(self.input_tokens, self.max_context_tokens or self.input_tokens, self.granted_tokens)
            self._usage = _Usage(
                input_tokens=reserved_input, output_tokens=self.granted_tokens - reserved_input, model=self.model
            )
        if self._usage is None:
            return None
        record = pb.UsageRecord(
            tenant_id=tenant_id,
            reservation_id=self.reservation_id,
            model=self._usage.model,
            input_tokens=self._usage.input_tokens,
            output_tokens=self._usage.output_tokens,
            cached_input_tokens=min(self._usage.cached_input_tokens, self._usage.input_tokens),
            tool_calls=self._usage.tool_calls,
            outcome=outcome,
            task_type=self._spec.task_type,
        )
        if not self.reservation_id:  # a fail-open step: charged to its task and step without a reservation
            record.task_id, record.step_id = self.task_id, self.step_id
            record.labels.update(self._spec.labels)
        return record

    def __repr__(self) -> str:
        decision = pb.Decision.Name(self.decision)
        where = f"{self.task_id!r}, {self.step_id!r}"
        return f"Step({where}, {decision}, model={self.model!r}, max_tokens={self.max_tokens})"


def _role(raw: Message) -> str:
    role = as_dict(raw).get("role")
    return role if isinstance(role, str) else ""


def decide(spec: StepSpec, response: pb.CheckResponse, *, approximate: bool) -> Step:
    """The step for an ALLOW or DEGRADE; CheckpointRequired or BudgetDenied for the others."""
    remaining = least_remaining(response)
    if response.decision in (pb.DECISION_ALLOW, pb.DECISION_DEGRADE):
        return Step(spec, response, approximate=approximate)
    message = response.message or pb.Reason.Name(response.reason)
    if response.decision == pb.DECISION_CHECKPOINT:
        raise CheckpointRequired(message, response=response, remaining_tokens=remaining)
    if response.decision == pb.DECISION_DENY:
        raise BudgetDenied(message, response=response, remaining_tokens=remaining)
    raise BudgetError(f"unexpected decision {response.decision}: {message}", response=response, remaining_tokens=None)


def unreachable(spec: StepSpec, error: grpc.RpcError, fail_mode: FailMode, addr: str) -> Step:
    """The local fail mode's answer when the sidecar could not be reached: an ALLOW step (open) or
    BudgetUnavailable (closed)."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    why = f"the budgetwarden sidecar at {addr} could not be reached ({code.name if code else error})"
    return fail_mode_answer(spec, fail_mode, why, error)


def throttled(spec: StepSpec, fail_mode: FailMode, addr: str) -> Step:
    """The local fail mode's answer for a check the client's adaptive throttle kept from the sidecar: the same as for
    an overload refusal, which is what the check would most likely have got."""
    why = (
        f"the check was not sent to the budgetwarden sidecar at {addr}: most recent checks were refused for overload "
        "(client-side throttling)"
    )
    return fail_mode_answer(spec, fail_mode, why, None)


def fail_mode_answer(spec: StepSpec, fail_mode: FailMode, why: str, error: BaseException | None) -> Step:
    """An ALLOW step marked ``from_fail_mode`` (open) or BudgetUnavailable saying ``why`` (closed)."""
    if fail_mode == "closed":
        raise BudgetUnavailable(f"{why}; fail_mode='closed' refuses the step") from error
    return Step(spec, pb.CheckResponse(decision=pb.DECISION_ALLOW), approximate=True, from_fail_mode=True)


def is_unreachable(error: grpc.RpcError) -> bool:
    """The sidecar could not decide: not reached, too late, or shedding load (CANCELLED by gRPC's pending bound, or
    RESOURCE_EXHAUSTED whose message starts "overloaded:"; a message too large for the channel is RESOURCE_EXHAUSTED
    too, and is the caller's to fix)."""
    code = getattr(error, "code", None)
    if not callable(code):
        return False
    if code() in UNREACHABLE:
        return True
    return is_overloaded(error)


def is_overloaded(error: grpc.RpcError) -> bool:
    """The sidecar refused the call for overload: RESOURCE_EXHAUSTED "overloaded:" from its handler, or CANCELLED from
    gRPC's pending bound (``--max-pending-calls``). Only these count against the client's adaptive throttle."""
    code = getattr(error, "code", None)
    if not callable(code):
        return False
    if code() == grpc.StatusCode.CANCELLED:
        return True
    details = getattr(error, "details", None)
    return code() == grpc.StatusCode.RESOURCE_EXHAUSTED and callable(details) and str(details()).startswith(OVERLOADED)


def outcome_of(exc: BaseException | None) -> pb.Outcome.ValueType:
    if exc is None:
        return pb.OUTCOME_COMPLETED
    if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)):
        return pb.OUTCOME_CANCELLED
    return pb.OUTCOME_FAILED
