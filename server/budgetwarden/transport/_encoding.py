"""Response encoding: the limiter's results as protobuf messages."""

from __future__ import annotations

import functools

from budgetwarden.domain import (
    Counter,
    Scope,
    ScopeKind,
    Thresholds,
    WindowSpan,
    remaining_of,
    threshold_of,
)
from budgetwarden.limiter import CheckResult
from budgetwarden_api.v1 import budget_pb2 as pb


def scope_state(scope: Scope, counter: Counter, thresholds: Thresholds | None = None) -> pb.ScopeState:
    state = pb.ScopeState()
    fill_scope_state(state, scope, counter, thresholds)
    return state


def fill_scope_state(state: pb.ScopeState, scope: Scope, counter: Counter, thresholds: Thresholds | None) -> None:
    state.CopyFrom(_scope_template(scope.name, scope.kind, scope.span))
    used, reserved = counter.used, counter.reserved
    if used:
        state.used_tokens = used
    if reserved:
        state.reserved_tokens = reserved
    if counter.used_usd:
        state.used_usd_micros = counter.used_usd
    if counter.reserved_usd:
        state.reserved_usd_micros = counter.reserved_usd
    limit = counter.limit
    if limit is not None:
        state.limit_tokens = limit
        left = limit - used - reserved  # remaining_of, inline (four scopes per check); set even at 0 (optional field)
        state.remaining_tokens = left if left > 0 else 0
    if counter.limit_usd is not None:
        state.limit_usd_micros = counter.limit_usd
        state.remaining_usd_micros = remaining_of(counter.limit_usd, counter.used_usd, counter.reserved_usd)
    if thresholds is not None and limit is not None and scope.kind is ScopeKind.TASK:
        if thresholds.soft_bp is not None:
            state.soft_limit_tokens = threshold_of(limit, thresholds.soft_bp)  # type: ignore[assignment]
        if thresholds.checkpoint_bp is not None:
            state.checkpoint_limit_tokens = threshold_of(limit, thresholds.checkpoint_bp)  # type: ignore[assignment]


@functools.lru_cache(maxsize=1024)
def _scope_template(name: str, kind: ScopeKind, span: WindowSpan | None) -> pb.ScopeState:
    """What a scope's state holds whatever its counter: name, kind and window times. Built once per scope (a window's
    scope lives as long as the window) and copied, which is cheaper than setting timestamps field by field."""
    state = pb.ScopeState(name=name, kind=int(kind))  # type: ignore[arg-type]
    if span is not None:
        state.window = int(span.window)  # type: ignore[assignment]
        state.window_start.FromMilliseconds(span.start_ms)
        state.resets_at.FromMilliseconds(span.end_ms)
    return state


def check_response(result: CheckResult) -> pb.CheckResponse:
    response = pb.CheckResponse()
    fill_check_response(response, result)
    return response


# The encoded scopes of answers whose scopes come back unchanged: a check its task's local slice decides answers with
# the slice's counters (the figures of its take, until the slice goes) under the policy's cached scopes, so every check
# of a slice encodes the same bytes. Keyed by what fill_scope_state reads: the identity of the thresholds and of each
# scope (frozen, and held by the entry, so no other object can take their ids meanwhile) and each counter's six figures
# (a per-step cap's counter is made anew for every check).
_ENCODED_SCOPES: dict[tuple[int | None, ...], tuple[object, bytes]] = {}
ENCODED_SCOPES_MAX = 1024


def check_response_bytes(result: CheckResult) -> bytes:
    """``check_response(result).SerializeToString()``, with the scopes' encoding remembered (see ``_ENCODED_SCOPES``):
    the answer's other fields are encoded, and the remembered scopes appended. A repeated field may come in any order
    and in parts in the protobuf encoding, so the bytes parse to the same message."""
    thresholds, scopes = result.thresholds, result.scopes
    key: list[int | None] = [id(thresholds)]
    for scope, c in scopes:
        key += (id(scope), c.limit, c.used, c.reserved, c.limit_usd, c.used_usd, c.reserved_usd)
    known = _ENCODED_SCOPES.get(tuple(key))
    if known is None:
        holder = pb.CheckResponse()
        for scope, counter in scopes:
            fill_scope_state(holder.scopes.add(), scope, counter, thresholds)
        known = ((thresholds, [scope for scope, _ in scopes]), holder.SerializeToString())
        if len(_ENCODED_SCOPES) >= ENCODED_SCOPES_MAX:
            _ENCODED_SCOPES.clear()  # bounded: slices come and go, and an answer of the store path never repeats
        _ENCODED_SCOPES[tuple(key)] = known
    response = pb.CheckResponse()
    _fill_answer(response, result)
    return response.SerializeToString() + known[1]


def fill_check_response(response: pb.CheckResponse, result: CheckResult) -> None:
    """Fills a CheckResponse in place (a stream builds it inside its result message, without a copy)."""
    _fill_answer(response, result)
    thresholds = result.thresholds
    for scope, counter in result.scopes:
        fill_scope_state(response.scopes.add(), scope, counter, thresholds)


def _fill_answer(response: pb.CheckResponse, result: CheckResult) -> None:
    """Every field of the answer but its scopes."""
    verdict = result.verdict
    # IntEnum members are ints: set as they are (their .value is a Python property, slower than the assignment).
    response.decision = verdict.decision  # type: ignore[assignment]
    response.reason = verdict.reason  # type: ignore[assignment]
    response.granted_tokens = verdict.granted
    response.message = verdict.message
    requested = result.requested
    response.requested_tokens = requested.tokens
    response.policy_version = result.policy_version
    # Fields at their default are left alone (proto3 sends nothing for them either way); setting one costs time.
    if result.reservation_id:
        response.reservation_id = result.reservation_id
    if verdict.binding_scope:
        response.binding_scope = verdict.binding_scope
    if result.from_fail_mode:
        response.from_fail_mode = True
    if result.replayed:
        response.replayed = True
    if verdict.granted_usd:
        response.granted_cost_usd_micros = verdict.granted_usd
    if requested.usd:
        response.requested_cost_usd_micros = requested.usd
    if result.model_assumed:
        response.model_assumed = True
    if verdict.checkpoint_id:
        response.checkpoint_id = verdict.checkpoint_id
    if verdict.binding_unit is not None:
        response.binding_unit = int(verdict.binding_unit)  # type: ignore[assignment]
    if result.lease_expires_ms is not None:
        response.lease_expires_at.FromMilliseconds(result.lease_expires_ms)
    if verdict.retry_after_ms is not None:
        response.retry_after.FromMilliseconds(verdict.retry_after_ms)
    if verdict.advice is not None:
        advice = verdict.advice
        response.advice.rung = advice.rung
        response.advice.model = advice.model
        response.advice.max_context_tokens = advice.max_context_tokens
        response.advice.max_output_tokens = advice.max_output_tokens
        if advice.max_tool_calls is not None:
            response.advice.max_tool_calls = advice.max_tool_calls
    if result.token_count is not None:
        count = result.token_count
        response.token_count.input_tokens = count.tokens
        response.token_count.encoding = count.encoding
        response.token_count.approximate = not count.exact
