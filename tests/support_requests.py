"""Requests the sidecar refuses, each with what its INVALID_ARGUMENT message says: the tables behind the direct tests
of the validation (tests/unit/test_validation.py) and the same requests over a real socket (integration/test_grpc.py).

A check's fields go into a check of task t1 of acme; a record's fields into the second record of a report whose first
record is good (its index in the message is 1)."""

from __future__ import annotations

from typing import Any

BAD_CHECKS: list[tuple[dict[str, Any], str]] = [
    ({"tenant_id": ""}, "tenant_id: is required"),
    ({"task_id": ""}, "task_id: is required"),
    ({"step_id": ""}, "step_id: is required"),
    ({"task_id": "x" * 257}, "task_id: is 257 bytes long"),
    ({"step_id": "é" * 129}, "step_id: is 258 bytes long"),
    ({"tenant_id": "a\nb"}, "tenant_id: contains a control character (U+000A at position 1)"),
    ({"estimated_input_tokens": -1}, "estimated_input_tokens: must not be negative"),
    ({"max_output_tokens": -5}, "max_output_tokens: must not be negative"),
    ({"estimated_input_tokens": 10**9 + 1}, "estimated_input_tokens: must be at most"),
    ({"planned_tool_calls": -1}, "planned_tool_calls: must not be negative"),
    ({"lease_seconds": 0}, "lease_seconds: must be between"),
    ({"lease_seconds": 86401}, "lease_seconds: must be between"),
    ({"task_ceiling_tokens": 0}, "task_ceiling_tokens: must be between"),
    ({"labels": {f"k{i}": "v" for i in range(33)}}, "labels: has 33 entries"),
    ({"labels": {"": "v"}}, "labels: keys must not be empty"),
    ({"labels": {"k": "v" * 257}}, "labels['k']: value is longer"),
    ({"task_type": "t" * 300}, "task_type: is 300 bytes long"),
]


BAD_RECORDS: list[tuple[dict[str, Any], str]] = [
    ({"tenant_id": ""}, "records[1].tenant_id: is required"),
    ({"task_id": "", "step_id": ""}, "records[1].reservation_id: is required unless"),
    ({"reservation_id": "not-hex"}, "records[1].reservation_id: is not a reservation id"),
    ({"input_tokens": -1}, "records[1].input_tokens: must not be negative"),
    ({"output_tokens": 10**10}, "records[1].output_tokens: must be at most"),
    ({"cached_input_tokens": 101}, "records[1].cached_input_tokens: (101) must not exceed input_tokens (100)"),
    ({"outcome": 42}, "records[1].outcome: unknown value 42"),
    ({"tool_calls": -3}, "records[1].tool_calls: must not be negative"),
    ({"idempotency_key": "k" * 300}, "records[1].idempotency_key: is longer"),
]


BAD_RELEASES: list[tuple[dict[str, Any], str]] = [
    ({"reservation_id": "abc"}, "tenant_id: is required"),
    ({"tenant_id": "acme"}, "reservation_id: is required unless"),
    ({"tenant_id": "acme", "reservation_id": "Z" * 32}, "reservation_id: is not a reservation id"),
]
