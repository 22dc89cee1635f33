"""Turns wire requests into validated domain inputs. Every error names the field it is about."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence

from budgetwarden.domain import (
    MAX_LIMIT_TOKENS,
    MAX_TOKENS_PER_FIELD,
    ChatMessage,
    CheckInput,
    Outcome,
    Prompt,
    UsageInput,
)
from budgetwarden.store import is_reservation_id, parse_fail_open_id
from budgetwarden_api.v1 import budget_pb2 as pb

MAX_ID_BYTES = 256
MAX_LABELS = 32
MAX_LABEL_BYTES = 256
MAX_TOOL_CALLS = 100_000
MAX_RECORDS = 1000
FUTURE_SKEW_MS = 5 * 60_000


# Control (Cc), format (Cf: bidi overrides such as U+202E, zero-width characters), line and paragraph separators (Zl,
# Zp): in an id or a label they break log lines and let one name pass for another on a dashboard.
_REFUSED_CATEGORIES = {"Cc": "a control", "Cf": "a format", "Zl": "a line separator", "Zp": "a paragraph separator"}


class InvalidRequestError(ValueError):
    """Bad input: ``field`` is its path in the request ("records[2].task_id"; empty for the request as a whole)."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)


def _refused_character(value: str) -> str | None:
    """What is wrong with ``value``'s first control, format or separator character, or None if it has none.

    Every such character is non-printable for str.isprintable (categories C* and Z* but the ASCII space), which runs in
    C: printable text, nearly every id, is done there. Only the rest is looked at character by character."""
    if value.isprintable():
        return None
    for position, char in enumerate(value):
        what = None if char.isprintable() else _REFUSED_CATEGORIES.get(unicodedata.category(char))
        if what is not None:
            return (
                f"contains {what} character (U+{ord(char):04X} at position {position}); control, format, line "
                "separator and paragraph separator characters (Unicode Cc, Cf, Zl, Zp) are not allowed"
            )
    return None


def ident(value: str, field: str, *, required: bool = True, max_bytes: int = MAX_ID_BYTES) -> str:
    """An id: present (when required), at most ``max_bytes`` of UTF-8, no control characters."""
    if not value:
        if required:
            raise InvalidRequestError(field, "is required")
        return value
    # Nearly every id: printable ASCII (one byte per character; its only non-printable characters are controls), short
    # enough. Decided by three calls that run in C, without encoding it.
    if len(value) <= max_bytes and value.isascii() and value.isprintable():
        return value
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidRequestError(field, f"is {size} bytes long, at most {max_bytes} are allowed")
    refused = _refused_character(value)
    if refused is not None:
        raise InvalidRequestError(field, refused)
    return value


def _count(value: int, field: str, bound: int = MAX_TOKENS_PER_FIELD) -> int:
    if value < 0:
        raise InvalidRequestError(field, f"must not be negative (got {value})")
    if value > bound:
        raise InvalidRequestError(field, f"must be at most {bound} (got {value})")
    return value


def _labels(labels: Mapping[str, str], field: str) -> dict[str, str]:
    if not labels:
        return {}
    items = dict(labels)
    if len(items) > MAX_LABELS:
        raise InvalidRequestError(field, f"has {len(items)} entries, at most {MAX_LABELS} are allowed")
    for key, value in items.items():
        if not key:
            raise InvalidRequestError(field, "keys must not be empty")
        for part, what in ((key, "key"), (value, "value")):
            if len(part.encode()) > MAX_LABEL_BYTES:
                raise InvalidRequestError(f"{field}[{key[:32]!r}]", f"{what} is longer than {MAX_LABEL_BYTES} bytes")
            refused = _refused_character(part)
            if refused is not None:
                raise InvalidRequestError(f"{field}[{key[:32]!r}]", f"{what} {refused}")
    return items


def _reservation(value: str, field: str) -> str:
    if value and not is_reservation_id(value):
        raise InvalidRequestError(
            field,
            "is not a reservation id issued by budgetwarden (32 lowercase hex characters, or fo1.… after a fail-open)",
        )
    grant = parse_fail_open_id(value)
    if grant is not None:
        # What a fail-open id carries becomes the record's task, step, model and task type: held to the same rules.
        parts = (grant.task_id, grant.step_id, grant.model, grant.task_type)
        for part, name in zip(parts, ("task id", "step id", "model", "task type"), strict=True):
            try:
                ident(part, field, required=False)
            except InvalidRequestError as exc:
                raise InvalidRequestError(field, f"is a fail-open id whose {name} {exc.problem}") from None
    return value


MAX_PROMPT_CHARS = 4 * 1024 * 1024
MAX_MESSAGES = 10_000


def _prompt(request: pb.CheckRequest) -> Prompt | None:
    which = request.WhichOneof("input")
    if which == "prompt_text":
        if len(request.prompt_text) > MAX_PROMPT_CHARS:
            raise InvalidRequestError("prompt_text", f"is longer than {MAX_PROMPT_CHARS} characters")
        return Prompt(text=request.prompt_text)
    if which == "prompt_messages":
        messages = request.prompt_messages.messages
        if not messages:
            raise InvalidRequestError("prompt_messages.messages", "must hold at least one message")
        if len(messages) > MAX_MESSAGES:
            raise InvalidRequestError("prompt_messages.messages", f"holds more than {MAX_MESSAGES} messages")
        out = []
        total = 0
        for i, message in enumerate(messages):
            at = f"prompt_messages.messages[{i}]"
            role = ident(message.role, f"{at}.role")
            name = ident(message.name, f"{at}.name", required=False)
            total += len(message.content)
            if total > MAX_PROMPT_CHARS:
                raise InvalidRequestError("prompt_messages", f"is longer than {MAX_PROMPT_CHARS} characters in all")
            out.append(ChatMessage(role, message.content, name))
        return Prompt(messages=tuple(out))
    return None


# Prompt text one CheckStream message may carry in all: as much as one check may, so a message is never more counting
# than the largest single prompt. (gRPC's default 4 MiB message limit binds first for ASCII; this holds whatever the
# transport lets through.)
MAX_MESSAGE_PROMPT_CHARS = MAX_PROMPT_CHARS


def message_prompt_chars(checks: Sequence[pb.CheckRequest]) -> int:
    """The prompt characters of a CheckStream message's checks together; more than MAX_MESSAGE_PROMPT_CHARS is
    InvalidRequestError (on ``checks``)."""
    total = 0
    for check in checks:
        which = check.WhichOneof("input")
        if which == "prompt_text":
            total += len(check.prompt_text)
        elif which == "prompt_messages":
            total += sum(len(message.content) for message in check.prompt_messages.messages)
    if total > MAX_MESSAGE_PROMPT_CHARS:
        raise InvalidRequestError(
            "checks",
            f"carry {total} characters of prompts, at most {MAX_MESSAGE_PROMPT_CHARS} are allowed in a message",
        )
    return total


def check_input(request: pb.CheckRequest, *, max_lease_seconds: int) -> tuple[CheckInput, Prompt | None]:
    """The validated request, and the prompt to count when it carries one instead of an estimate."""
    lease = None
    if request.HasField("lease_seconds"):
        lease = request.lease_seconds
        if not 1 <= lease <= max_lease_seconds:
            raise InvalidRequestError("lease_seconds", f"must be between 1 and {max_lease_seconds} (got {lease})")
    ceiling = None
    if request.HasField("task_ceiling_tokens"):
        ceiling = request.task_ceiling_tokens
        if not 1 <= ceiling <= MAX_LIMIT_TOKENS:
            raise InvalidRequestError(
                "task_ceiling_tokens", f"must be between 1 and {MAX_LIMIT_TOKENS} (got {ceiling})"
            )
    tenant_id, task_id, step_id = request.tenant_id, request.task_id, request.step_id
    task_type, model = request.task_type, request.model
    input_tokens, output_tokens = request.estimated_input_tokens, request.max_output_tokens
    tool_calls = request.planned_tool_calls
    # The common request, accepted without a call per field (the same rules: ``ident`` and ``_count`` accept exactly
    # this); anything else goes through them, which name the first field that is wrong.
    ids = tenant_id + task_id + step_id + task_type + model
    if not (
        tenant_id
        and task_id
        and step_id
        and ids.isascii()
        and ids.isprintable()
        and max(len(tenant_id), len(task_id), len(step_id), len(task_type), len(model)) <= MAX_ID_BYTES
        and 0 <= input_tokens <= MAX_TOKENS_PER_FIELD
        and 0 <= output_tokens <= MAX_TOKENS_PER_FIELD
        and 0 <= tool_calls <= MAX_TOOL_CALLS
    ):
        ident(tenant_id, "tenant_id")
        ident(task_id, "task_id")
        ident(step_id, "step_id")
        ident(task_type, "task_type", required=False)
        ident(model, "model", required=False)
        _count(input_tokens, "estimated_input_tokens")
        _count(output_tokens, "max_output_tokens")
        _count(tool_calls, "planned_tool_calls", MAX_TOOL_CALLS)
    checked = CheckInput(
        tenant_id=tenant_id,
        task_id=task_id,
        step_id=step_id,
        task_type=task_type,
        model=model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        tool_calls=tool_calls,
        labels=_labels(request.labels, "labels") if request.labels else {},
        lease_seconds=lease,
        task_ceiling=ceiling,
    )
    return checked, _prompt(request) if request.WhichOneof("input") else None


def usage_inputs(request: pb.ReportRequest | pb.ReportStreamRequest, now_ms: int) -> list[UsageInput]:
    if not request.records:
        raise InvalidRequestError("records", "must hold at least one record")
    if len(request.records) > MAX_RECORDS:
        raise InvalidRequestError("records", f"holds {len(request.records)} records, at most {MAX_RECORDS} are allowed")
    return [_usage(record, f"records[{i}]", now_ms) for i, record in enumerate(request.records)]


def _usage(record: pb.UsageRecord, at: str, now_ms: int) -> UsageInput:
    reservation = _reservation(record.reservation_id, f"{at}.reservation_id")
    task_id = ident(record.task_id, f"{at}.task_id", required=False)
    step_id = ident(record.step_id, f"{at}.step_id", required=False)
    if not reservation and not (task_id and step_id):
        raise InvalidRequestError(f"{at}.reservation_id", "is required unless task_id and step_id are both given")
    input_tokens = _count(record.input_tokens, f"{at}.input_tokens")
    cached = _count(record.cached_input_tokens, f"{at}.cached_input_tokens")
    if cached > input_tokens:
        raise InvalidRequestError(
            f"{at}.cached_input_tokens", f"({cached}) must not exceed input_tokens ({input_tokens})"
        )
    if record.outcome not in pb.Outcome.values():
        raise InvalidRequestError(f"{at}.outcome", f"unknown value {record.outcome}")
    timestamp_ms = None
    if record.HasField("timestamp"):
        ts = record.timestamp
        if not 0 <= ts.nanos < 1_000_000_000 or ts.seconds <= 0:
            raise InvalidRequestError(f"{at}.timestamp", "is not a valid time")
        timestamp_ms = ts.seconds * 1000 + ts.nanos // 1_000_000
        if timestamp_ms > now_ms + FUTURE_SKEW_MS:
            raise InvalidRequestError(f"{at}.timestamp", "is more than 5 minutes in the future")
    output_tokens = _count(record.output_tokens, f"{at}.output_tokens")
    outcome = Outcome(record.outcome or Outcome.COMPLETED)
    tool_calls = _count(record.tool_calls, f"{at}.tool_calls", MAX_TOOL_CALLS)
    # A completed step that used nothing is almost always a report missing its figures; applying it would refund the
    # reservation and make the true report a duplicate. A step that did not run is released (or reported as such).
    if input_tokens == 0 and output_tokens == 0 and tool_calls == 0 and outcome is Outcome.COMPLETED:
        raise InvalidRequestError(
            f"{at}.input_tokens",
            "a record of a completed step must report usage (input_tokens, output_tokens or tool_calls above 0); "
            "for a step that did not run, call Release, or report it with outcome FAILED or CANCELLED",
        )
    idempotency_key = record.idempotency_key
    if len(idempotency_key.encode()) > MAX_ID_BYTES:
        raise InvalidRequestError(f"{at}.idempotency_key", f"is longer than {MAX_ID_BYTES} bytes")
    ident(idempotency_key, f"{at}.idempotency_key", required=False)  # its characters
    return UsageInput(
        tenant_id=ident(record.tenant_id, f"{at}.tenant_id"),
        reservation_id=reservation,
        task_id=task_id,
        step_id=step_id,
        task_type=ident(record.task_type, f"{at}.task_type", required=False),
        model=ident(record.model, f"{at}.model", required=False),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=cached,
        tool_calls=tool_calls,
        outcome=outcome,
        idempotency_key=idempotency_key,
        timestamp_ms=timestamp_ms,
        labels=_labels(record.labels, f"{at}.labels"),
    )


def release_target(request: pb.ReleaseRequest) -> tuple[str, str, str, str]:
    tenant_id = ident(request.tenant_id, "tenant_id")
    reservation = _reservation(request.reservation_id, "reservation_id")
    task_id = ident(request.task_id, "task_id", required=False)
    step_id = ident(request.step_id, "step_id", required=False)
    if not reservation and not (task_id and step_id):
        raise InvalidRequestError("reservation_id", "is required unless task_id and step_id are both given")
    return tenant_id, reservation, task_id, step_id


def budget_target(request: pb.GetBudgetRequest) -> tuple[str, str, str]:
    return (
        ident(request.tenant_id, "tenant_id"),
        ident(request.task_id, "task_id", required=False),
        ident(request.task_type, "task_type", required=False),
    )
