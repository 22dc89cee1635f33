"""The validation on its own, table-driven: every request tests/integration/test_grpc.py sends over a socket (the
tables of support_requests) is refused here by the function the servicer calls, with the message that names the field;
and good requests come out as the domain inputs they mean. No socket, no Redis."""

from __future__ import annotations

from typing import Any

import pytest

from budgetwarden.domain._model import CheckInput, Outcome
from budgetwarden.transport._validation import (
    InvalidRequestError,
    budget_target,
    check_input,
    release_target,
    usage_inputs,
)
from budgetwarden_api.v1 import budget_pb2 as pb

from support_requests import BAD_CHECKS, BAD_RECORDS, BAD_RELEASES

NOW_MS = 1_796_000_000_000
MAX_LEASE_SECONDS = 86_400  # the sidecar's default max_lease_seconds
RESERVATION = "0123456789abcdef0123456789abcdef"


def check_request(**fields: Any) -> pb.CheckRequest:
    values: dict[str, Any] = {"tenant_id": "acme", "task_id": "t1", "step_id": "s1", "estimated_input_tokens": 100}
    return pb.CheckRequest(**(values | fields))


def record(step: str = "s1", **fields: Any) -> pb.UsageRecord:
    values: dict[str, Any] = {"tenant_id": "acme", "task_id": "t1", "step_id": step, "input_tokens": 100}
    return pb.UsageRecord(**(values | fields))


@pytest.mark.parametrize(("fields", "message"), BAD_CHECKS)
def test_a_bad_check_is_refused_naming_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_input(check_request(**fields), max_lease_seconds=MAX_LEASE_SECONDS)
    assert message in str(refused.value)
    assert str(refused.value).startswith(f"{refused.value.field}: ")


@pytest.mark.parametrize(("fields", "message"), BAD_RECORDS)
def test_a_bad_record_refuses_the_whole_report_naming_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        usage_inputs(pb.ReportRequest(records=[record("s1"), record("s2", **fields)]), NOW_MS)
    assert message in str(refused.value)
    assert refused.value.field.startswith("records[1].")


@pytest.mark.parametrize(("fields", "message"), BAD_RELEASES)
def test_a_bad_release_is_refused_naming_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        release_target(pb.ReleaseRequest(**fields))
    assert message in str(refused.value)


def test_a_get_budget_without_a_tenant_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match=r"^tenant_id: is required"):
        budget_target(pb.GetBudgetRequest(task_id="t1"))


def test_a_good_check_becomes_the_check_it_means() -> None:
    request = check_request(
        max_output_tokens=50, planned_tool_calls=2, lease_seconds=60, task_ceiling_tokens=5000, labels={"user": "u1"}
    )
    checked, prompt = check_input(request, max_lease_seconds=MAX_LEASE_SECONDS)
    assert prompt is None  # an estimate, no prompt text to count
    assert checked == CheckInput(
        tenant_id="acme",
        task_id="t1",
        step_id="s1",
        task_type="",
        model="",
        input_tokens=100,
        output_tokens=50,
        tool_calls=2,
        labels={"user": "u1"},
        lease_seconds=60,
        task_ceiling=5000,
    )


def test_good_records_and_targets_become_what_they_mean() -> None:
    (parsed,) = usage_inputs(pb.ReportRequest(records=[record(output_tokens=7, idempotency_key="k")]), NOW_MS)
    assert (parsed.tenant_id, parsed.task_id, parsed.step_id) == ("acme", "t1", "s1")
    assert (parsed.input_tokens, parsed.output_tokens, parsed.idempotency_key) == (100, 7, "k")
    assert parsed.outcome == Outcome.COMPLETED
    assert release_target(pb.ReleaseRequest(tenant_id="acme", reservation_id=RESERVATION)) == (
        "acme",
        RESERVATION,
        "",
        "",
    )
    assert budget_target(pb.GetBudgetRequest(tenant_id="acme", task_id="t1")) == ("acme", "t1", "")
