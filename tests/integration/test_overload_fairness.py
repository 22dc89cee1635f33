"""Overload (issue 16), fairness under CPU overload: while the sidecar's event loop is busy past --overload-busy-share,
a check of a tenant that asked more than an equal part and took its fair share of the checks admitted lately is shed
with RESOURCE_EXHAUSTED "overloaded: ...", counted in budgetwarden.check.shed with reason fair_share, while a quiet
tenant is still admitted. Over a real socket; the overload signal is driven by the test (the Admission's
``overloaded``; fairness is off by default, on here), and its clock is frozen so the counts do not fade under the
test: no timing involved."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from budgetwarden.transport import Admission
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import BudgetClient, CheckRefusedError

from support import RunningSidecar, free_port

RPC_TIMEOUT_S = 60.0
FROZEN_AT = 1000.0


def check(client: BudgetClient, tenant: str, step: str) -> tuple[grpc.StatusCode, str]:
    """The status code and message of a check (OK and "" when it was answered)."""
    try:
        client.check(tenant_id=tenant, task_id="t", step_id=step, estimated_input_tokens=10)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""


def shed_by_reason(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (sample.labels["budgetwarden_tenant"], sample.labels["budgetwarden_reason"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "budgetwarden_check_shed_total" and "budgetwarden_reason" in sample.labels
    }


def admission_of(running: RunningSidecar) -> Admission:
    assert running.sidecar is not None
    assert running.sidecar.servicer is not None
    return running.sidecar.servicer.admission


def test_under_cpu_overload_the_noisy_tenant_is_shed_and_the_quiet_one_admitted(
    start_sidecar: Callable[..., RunningSidecar], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    running = start_sidecar(metrics_port=port, overload_busy_share=0.9)
    admission = admission_of(running)
    assert admission.overload_busy == 0.9
    monkeypatch.setattr(admission, "clock", lambda: FROZEN_AT)
    monkeypatch.setattr(admission, "scale_origin", FROZEN_AT)
    monkeypatch.setattr(admission, "forgotten_at", FROZEN_AT)
    with BudgetClient(running.addr, timeout=RPC_TIMEOUT_S) as client:
        # Before the overload everybody gets in: the noisy tenant asks twenty times what the quiet one asks.
        for n in range(20):
            assert check(client, "noisy", f"n{n}") == (grpc.StatusCode.OK, "")
        assert check(client, "quiet", "q0") == (grpc.StatusCode.OK, "")

        monkeypatch.setattr(admission, "overloaded", lambda: True)
        code, message = check(client, "noisy", "n-over")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
        assert message.startswith("overloaded: this sidecar's CPU is behind"), message
        assert "tenant 'noisy' took 95% of the checks admitted lately, at least its fair share" in message, message
        assert message.endswith("nothing was reserved, retry with backoff"), message
        for n in range(3):
            assert check(client, "quiet", f"q-over{n}") == (grpc.StatusCode.OK, "")
        assert check(client, "noisy", "n-over2")[0] == grpc.StatusCode.RESOURCE_EXHAUSTED

        monkeypatch.setattr(admission, "overloaded", lambda: False)
        assert check(client, "noisy", "n-after") == (grpc.StatusCode.OK, "")  # once the CPU catches up
    assert admission.in_flight == 0
    shed = shed_by_reason(port)
    assert shed.get(("noisy", "fair_share")) == 2, shed
    assert shed.get(("quiet", "fair_share"), 0) == 0, shed


def test_a_check_stream_sheds_the_noisy_tenants_checks_of_a_message_and_keeps_the_quiet_ones(
    start_sidecar: Callable[..., RunningSidecar], monkeypatch: pytest.MonkeyPatch
) -> None:
    running = start_sidecar(overload_busy_share=0.9)
    admission = admission_of(running)
    monkeypatch.setattr(admission, "clock", lambda: FROZEN_AT)
    monkeypatch.setattr(admission, "scale_origin", FROZEN_AT)
    monkeypatch.setattr(admission, "forgotten_at", FROZEN_AT)
    with BudgetClient(running.addr, timeout=RPC_TIMEOUT_S) as client:
        for n in range(20):
            assert check(client, "noisy", f"n{n}") == (grpc.StatusCode.OK, "")
        assert check(client, "quiet", "q0") == (grpc.StatusCode.OK, "")
        monkeypatch.setattr(admission, "overloaded", lambda: True)
        noisy, quiet = client.check_many(
            [
                {"tenant_id": "noisy", "task_id": "t", "step_id": "sn", "estimated_input_tokens": 10},
                {"tenant_id": "quiet", "task_id": "t", "step_id": "sq", "estimated_input_tokens": 10},
            ]
        )
    assert isinstance(noisy, CheckRefusedError)
    assert noisy.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert noisy.details().startswith("checks[0]: overloaded: this sidecar's CPU is behind"), noisy.details()
    assert isinstance(quiet, pb.CheckResponse), quiet
    assert quiet.decision == pb.DECISION_ALLOW
