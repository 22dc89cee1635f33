"""Telemetry.check makes a distinct check's attributes once: what it exports is what making them every time exported,
the caps (first come, first served) included."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from budgetwarden.telemetry import _metrics
from budgetwarden.telemetry._metrics import OVERFLOW, Telemetry


def check(telemetry: Telemetry, tenant: str, model: str = "m", decision: str = "ALLOW", reserved: int = 10) -> None:
    telemetry.check(
        tenant_id=tenant,
        task_type="plain",
        model=model,
        decision=decision,
        reason="WITHIN_BUDGET" if decision == "ALLOW" else "TASK_BUDGET_EXHAUSTED",
        reserved_tokens=reserved,
        fail_mode=None,
        seconds=0.001,
        labels={},
    )


def points(reader: InMemoryMetricReader, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
    data = reader.get_metrics_data()
    assert data is not None
    out = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        value = point.count if hasattr(point, "bucket_counts") else point.value
                        out[tuple(sorted(point.attributes.items()))] = value
    return out


def test_the_caps_and_the_counts_are_what_each_check_would_have_made() -> None:
    reader = InMemoryMetricReader()
    telemetry = Telemetry(MeterProvider(metric_readers=[reader]), max_tenants=1, max_task_types=1)
    check(telemetry, "a", decision="DENY", reserved=0)  # a's model is not counted: it reserved nothing
    check(telemetry, "b")  # over the tenant cap
    check(telemetry, "a", model="n")  # n is the first model counted ...
    check(telemetry, "a", model="m")  # ... m the second (the model cap is 4 x 1)
    check(telemetry, "a", decision="DENY", reserved=0)
    check(telemetry, "a", model="n")
    decisions = points(reader, "budgetwarden.check.decisions")
    deny = (("budgetwarden.decision", "DENY"), ("budgetwarden.reason", "TASK_BUDGET_EXHAUSTED"))
    allow = (("budgetwarden.decision", "ALLOW"), ("budgetwarden.reason", "WITHIN_BUDGET"))
    kind = (("budgetwarden.task_type", "plain"),)
    assert decisions == {
        tuple(sorted((*deny, ("budgetwarden.tenant", "a"), *kind))): 2,
        tuple(sorted((*allow, ("budgetwarden.tenant", OVERFLOW), *kind))): 1,
        tuple(sorted((*allow, ("budgetwarden.tenant", "a"), *kind))): 3,
    }
    reserved = points(reader, "budgetwarden.tokens.reserved")
    assert reserved == {
        tuple(sorted((("budgetwarden.tenant", OVERFLOW), *kind, ("gen_ai.request.model", "m")))): 10,
        tuple(sorted((("budgetwarden.tenant", "a"), *kind, ("gen_ai.request.model", "n")))): 20,
        tuple(sorted((("budgetwarden.tenant", "a"), *kind, ("gen_ai.request.model", "m")))): 10,
    }
    assert points(reader, "budgetwarden.check.duration") == {
        (("budgetwarden.decision", "ALLOW"),): 4,
        (("budgetwarden.decision", "DENY"),): 2,
    }
    assert telemetry.model.values() == ["m", "n"]


def test_the_attributes_made_are_bounded() -> None:
    reader = InMemoryMetricReader()
    telemetry = Telemetry(MeterProvider(metric_readers=[reader]), max_tenants=1)
    for n in range(_metrics.CHECK_ATTRIBUTES_MAX + 10):
        check(telemetry, f"t{n}")
    assert len(telemetry._check_attributes) <= _metrics.CHECK_ATTRIBUTES_MAX
    decisions = points(reader, "budgetwarden.check.decisions")
    assert sum(decisions.values()) == _metrics.CHECK_ATTRIBUTES_MAX + 10
