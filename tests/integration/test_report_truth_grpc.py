"""Issue 11, items 4 and 5 over a real socket: a reused idempotency key under another record is ALREADY_EXISTS naming
the record and applies nothing of the request; the reporter drops such a record instead of retrying it; an empty
report is INVALID_ARGUMENT pointing to Release (the rules themselves: tests/store/test_report_truth.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_api.v1 import budget_pb2_grpc as pb_grpc
from budgetwarden_client import BackgroundReporter

from support import RunningSidecar

TENANT = "acme"


@pytest.fixture
def stub(sidecar: RunningSidecar) -> Iterator[pb_grpc.BudgetServiceStub]:
    with grpc.insecure_channel(sidecar.addr) as channel:
        yield pb_grpc.BudgetServiceStub(channel)


def record(step: str, tokens: int, key: str = "", **fields: Any) -> pb.UsageRecord:
    return pb.UsageRecord(tenant_id=TENANT, task_id="t1", step_id=step, input_tokens=tokens, idempotency_key=key,
                          **fields)  # fmt: skip


def test_grpc_report_with_a_reused_key_is_already_exists_naming_the_record(stub: pb_grpc.BudgetServiceStub) -> None:
    stub.Report(pb.ReportRequest(records=[record("s1", 100, "k")]), timeout=10)
    again = stub.Report(pb.ReportRequest(records=[record("s1", 100, "k")]), timeout=10)
    assert again.results[0].status == pb.REPORT_STATUS_DUPLICATE
    with pytest.raises(grpc.RpcError) as refused:
        stub.Report(pb.ReportRequest(records=[record("s2", 1, "k2"), record("s3", 2, "k3"), record("s1", 999, "k")]),
                    timeout=10)  # fmt: skip
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert refused.value.details().startswith("records[2].idempotency_key: ")
    assert "nothing of this request was applied" in refused.value.details()
    # The first two records were not applied either: they are applied now.
    fresh = stub.Report(pb.ReportRequest(records=[record("s2", 1, "k2"), record("s3", 2, "k3")]), timeout=10)
    assert [r.status for r in fresh.results] == [pb.REPORT_STATUS_UNRESERVED] * 2

    messages = [pb.ReportStreamRequest(records=[record("s4", 1, "k4")]),
                pb.ReportStreamRequest(records=[record("s5", 1, "k5"), record("s1", 7, "k")])]  # fmt: skip
    with pytest.raises(grpc.RpcError) as refused:
        stub.ReportStream(iter(messages), timeout=10)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert refused.value.details().startswith("message 1: records[1].idempotency_key: ")


def test_the_reporter_drops_a_refused_record_with_an_error_instead_of_retrying_it(
    sidecar: RunningSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    with BackgroundReporter(sidecar.addr, max_retries=None) as reporter:
        assert reporter.report(record("s1", 100, "k"))
        assert reporter.flush(timeout=30)
        assert reporter.report(record("s2", 5, "k2"))
        assert reporter.report(record("s1", 999, "k"))  # another record under a used key
        assert reporter.report(record("s3", 5, "k3"))
        with caplog.at_level(logging.ERROR, logger="budgetwarden_client.reporter"):
            assert reporter.flush(timeout=30), "a refused record is not retried forever"
        stats = reporter.stats.snapshot()
    assert stats.rejected == 1
    assert stats.applied + stats.unreserved == 3
    assert any("ALREADY" in r.getMessage() or "idempotency_key" in r.getMessage() for r in caplog.records)


def test_grpc_empty_report_is_invalid_argument_and_the_true_report_then_applies(
    stub: pb_grpc.BudgetServiceStub,
) -> None:
    checked = stub.Check(pb.CheckRequest(tenant_id=TENANT, task_id="t1", step_id="r1", estimated_input_tokens=1000),
                         timeout=10)  # fmt: skip
    assert checked.decision == pb.DECISION_ALLOW
    with pytest.raises(grpc.RpcError) as refused:
        stub.Report(pb.ReportRequest(records=[record("r1", 0)]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "records[0].input_tokens" in refused.value.details()
    assert "Release" in refused.value.details()
    [result] = stub.Report(pb.ReportRequest(records=[record("r1", 800)]), timeout=10).results
    assert (result.status, result.refunded_tokens) == (pb.REPORT_STATUS_APPLIED, 200)
    # Neither the record nor its check named a model: priced at default_model, and the result says so.
    assert (result.model, result.model_assumed) == ("", True)
