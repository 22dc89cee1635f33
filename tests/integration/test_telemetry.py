"""Metrics as an operator and a billing team receive them: a real OTLP receiver (gRPC and HTTP), a real Prometheus
scrape parsed with the Prometheus text-format parser, and the cardinality guard."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as otlp
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as otlp_grpc
from prometheus_client.parser import text_string_to_metric_families

from budgetwarden.telemetry._metrics import SECONDS_BUCKETS, TOKEN_BUCKETS
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import BudgetClient

from support import TEST_RPC_TIMEOUT_S, RunningSidecar, free_port

POLICY = """
default_tenant: {windows: {day: {tokens: 1000000}}}
models:
  gpt-x: {input_usd_per_mtok: 10, output_usd_per_mtok: 30, provider: openai}
default_task_type: agent
task_types:
  agent: {per_task: {tokens: 100000}, per_step: {tokens: 5000}}
"""


class Receiver(otlp_grpc.MetricsServiceServicer):
    """An OTLP/gRPC metrics endpoint that keeps every export it receives."""

    def __init__(self) -> None:
        self.requests: list[otlp.ExportMetricsServiceRequest] = []

    def Export(self, request: otlp.ExportMetricsServiceRequest, context: Any) -> otlp.ExportMetricsServiceResponse:  # noqa: N802
        self.requests.append(request)
        return otlp.ExportMetricsServiceResponse()


@pytest.fixture
def grpc_receiver() -> Iterator[tuple[Receiver, int]]:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    otlp_grpc.add_MetricsServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, port
    server.stop(0)


@pytest.fixture
def http_receiver() -> Iterator[tuple[list[otlp.ExportMetricsServiceRequest], int]]:
    received: list[otlp.ExportMetricsServiceRequest] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            assert self.path == "/v1/metrics"
            assert self.headers["Content-Type"] == "application/x-protobuf"
            received.append(otlp.ExportMetricsServiceRequest.FromString(body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()
            self.wfile.write(otlp.ExportMetricsServiceResponse().SerializeToString())

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield received, server.server_address[1]
    server.shutdown()


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def scripted(addr: str) -> dict[str, int]:
    """3 allowed checks, 1 denied, 2 reports: what the metrics must add up to."""
    with BudgetClient(addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        for step in ("s1", "s2", "s3"):
            answer = client.check(
                tenant_id="acme", task_id="t1", step_id=step, model="gpt-x", estimated_input_tokens=1000,
                max_output_tokens=200, labels={"user": "ann", "session": "x1"},
            )  # fmt: skip
            assert answer.decision == pb.DECISION_ALLOW
        denied = client.check(tenant_id="acme", task_id="t1", step_id="s4", model="gpt-x", estimated_input_tokens=9000)
        assert denied.decision == pb.DECISION_DENY
        records = [
            pb.UsageRecord(
                tenant_id="acme", task_id="t1", step_id="s1", model="gpt-x", input_tokens=900, output_tokens=150
            ),
            pb.UsageRecord(
                tenant_id="acme", task_id="t1", step_id="s2", model="gpt-x", input_tokens=1100, cached_input_tokens=100,
                output_tokens=250,
            ),
        ]  # fmt: skip
        client.report(records)
    return {"input": 2000, "output": 400, "records": 2, "reserved": 3600, "refunded": 1200 - 1050}


def metrics_of(request: otlp.ExportMetricsServiceRequest) -> dict[str, Any]:
    return {m.name: m for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def attrs(point: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in point.attributes}


def last_export(received: list[otlp.ExportMetricsServiceRequest]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for request in received:
        merged |= metrics_of(request)
    return merged


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def check_otlp_export(received: list[otlp.ExportMetricsServiceRequest], expected: dict[str, int]) -> None:
    resource = {kv.key: kv.value.string_value for kv in received[-1].resource_metrics[0].resource.attributes}
    assert resource["service.name"] == "budgetwarden"
    assert resource["k8s.pod.name"] == "agent-7f9c"
    assert resource["k8s.namespace.name"] == "agents"
    metrics = last_export(received)

    decisions = metrics["budgetwarden.check.decisions"]
    assert decisions.unit == "{decision}"
    assert decisions.sum.is_monotonic
    by_decision: dict[str, int] = defaultdict(int)
    for point in decisions.sum.data_points:
        labels = attrs(point)
        assert labels["budgetwarden.tenant"] == "acme"
        assert labels["budgetwarden.task_type"] == "agent"
        assert labels.get("budgetwarden.label.user") == "ann" or labels["budgetwarden.decision"] == "DENY"
        assert "budgetwarden.label.session" not in labels  # not allow-listed
        assert not any("task_id" in key or "step" in key for key in labels)
        by_decision[labels["budgetwarden.decision"]] += point.as_int
    assert dict(by_decision) == {"ALLOW": 3, "DENY": 1}

    usage = metrics["gen_ai.client.token.usage"]
    assert usage.unit == "{token}"
    sums = {}
    for point in usage.histogram.data_points:
        labels = attrs(point)
        assert list(point.explicit_bounds) == list(TOKEN_BUCKETS)
        assert labels["gen_ai.request.model"] == "gpt-x"
        assert labels["gen_ai.provider.name"] == "openai"
        assert labels["gen_ai.operation.name"] == "chat"
        sums[labels["gen_ai.token.type"]] = (point.sum, point.count)
    assert sums == {"input": (expected["input"], 2), "output": (expected["output"], 2)}

    duration = metrics["budgetwarden.check.duration"]
    assert duration.unit == "s"
    assert list(duration.histogram.data_points[0].explicit_bounds) == list(SECONDS_BUCKETS)
    assert sum(p.count for p in duration.histogram.data_points) == 4

    def total(name: str) -> float:
        points = metrics[name].sum.data_points
        return sum(p.as_int or p.as_double for p in points)

    assert total("budgetwarden.tokens.reserved") == expected["reserved"]
    assert total("budgetwarden.tokens.consumed") == expected["input"] + expected["output"]
    assert total("budgetwarden.tokens.refunded") == 150 + 0  # s1 reserved 1200, used 1050; s2 used 1350 > 1200
    assert total("budgetwarden.cost.consumed_usd") == pytest.approx((2000 * 10 + 400 * 30) / 1e6)
    assert metrics["budgetwarden.cost.consumed_usd"].unit == "{USD}"
    statuses = {
        attrs(p)["budgetwarden.report.status"]: p.as_int for p in metrics["budgetwarden.reports"].sum.data_points
    }
    assert statuses == {"applied": 2}
    assert "budgetwarden.redis.duration" in metrics
    active = {
        attrs(p)["budgetwarden.tenant"]: p.as_int for p in metrics["budgetwarden.reservations.active"].gauge.data_points
    }
    assert active == {"acme": 1}  # s3 is still held
    remaining = {
        attrs(p)["budgetwarden.window"]: p.as_int for p in metrics["budgetwarden.budget.remaining"].gauge.data_points
    }
    assert remaining == {"day": 1_000_000 - 2400 - 1200}


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_otlp_export_adds_up(
    start_sidecar: Callable[..., RunningSidecar],
    grpc_receiver: tuple[Receiver, int],
    http_receiver: tuple[list[otlp.ExportMetricsServiceRequest], int],
    policy_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    protocol: str,
) -> None:
    receiver, grpc_port = grpc_receiver
    http_received, http_port = http_receiver
    endpoint = f"http://127.0.0.1:{grpc_port}" if protocol == "grpc" else f"http://127.0.0.1:{http_port}"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100000")  # only the final export at shutdown
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    monkeypatch.setenv("POD_NAME", "agent-7f9c")
    monkeypatch.setenv("POD_NAMESPACE", "agents")
    running = start_sidecar(policy_file=policy_file, metric_labels="user")
    expected = scripted(running.addr)
    running.stop()  # shutdown exports what was recorded
    received = receiver.requests if protocol == "grpc" else http_received
    assert received, "nothing was exported"
    check_otlp_export(received, expected)
    resource = {kv.key: kv.value.string_value for kv in received[-1].resource_metrics[0].resource.attributes}
    assert resource["deployment.environment"] == "test"


def test_unknown_attributes_are_left_out_of_the_export(
    start_sidecar: Callable[..., RunningSidecar],
    grpc_receiver: tuple[Receiver, int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A check with no task type (denied: this policy has no default), one with no model, and a report for a step never
    checked with neither: the exported points have no budgetwarden.task_type / gen_ai.request.model rather than ""."""
    receiver, port = grpc_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100000")  # only the final export at shutdown
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.replace("default_task_type: agent\n", ""))
    running = start_sidecar(policy_file=policy)
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        denied = client.check(tenant_id="acme", task_id="t0", step_id="s", estimated_input_tokens=100)
        assert denied.decision == pb.DECISION_DENY
        allowed = client.check(tenant_id="acme", task_id="t", step_id="s", task_type="agent", estimated_input_tokens=9)
        assert allowed.decision == pb.DECISION_ALLOW
        client.report([pb.UsageRecord(tenant_id="acme", task_id="never-checked", step_id="s", input_tokens=10)])
    running.stop()
    metrics = last_export(receiver.requests)
    points = {name: [attrs(p) for p in metrics[name].sum.data_points] for name in (
        "budgetwarden.check.decisions", "budgetwarden.tokens.reserved", "budgetwarden.tokens.consumed")}  # fmt: skip
    assert all(points.values()), points
    assert [p for p in points["budgetwarden.check.decisions"] if p["budgetwarden.decision"] == "DENY"]
    for name, found in points.items():
        for labels in found:
            assert "" not in labels.values(), (name, labels)
            assert "gen_ai.request.model" not in labels, (name, labels)
    assert all("budgetwarden.task_type" not in labels for labels in points["budgetwarden.tokens.consumed"]), points


def scrape(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_sum(families: dict[str, Any], family: str, suffix: str = "", **labels: str) -> float:
    return sum(
        s.value
        for s in families[family].samples
        if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_prometheus_scrape_adds_up(start_sidecar: Callable[..., RunningSidecar], policy_file: Path) -> None:
    port = free_port()
    running = start_sidecar(policy_file=policy_file, metrics_port=port, metrics_host="127.0.0.1", metric_labels="user")
    expected = scripted(running.addr)
    families = scrape(port)
    decisions = "budgetwarden_check_decisions"
    assert families[decisions].type == "counter"
    assert sample_sum(families, decisions, "_total", budgetwarden_decision="ALLOW", budgetwarden_label_user="ann") == 3
    assert sample_sum(families, decisions, "_total", budgetwarden_decision="DENY") == 1
    usage = "gen_ai_client_token_usage"
    assert families[usage].type == "histogram"
    assert sample_sum(families, usage, "_sum", gen_ai_token_type="input") == expected["input"]
    assert sample_sum(families, usage, "_count", gen_ai_token_type="output") == expected["records"]
    assert families["budgetwarden_check_duration_seconds"].type == "histogram"
    assert sample_sum(families, "budgetwarden_check_duration_seconds", "_count") == 4
    consumed = "budgetwarden_tokens_consumed"
    assert sample_sum(families, consumed, "_total", gen_ai_request_model="gpt-x") == 2400
    assert sample_sum(families, "budgetwarden_cost_consumed_usd", "_total") == pytest.approx(0.032)
    assert sample_sum(families, "budgetwarden_reservations_active", "", budgetwarden_tenant="acme") == 1


def test_cardinality_guard(start_sidecar: Callable[..., RunningSidecar], policy_file: Path) -> None:
    port = free_port()
    running = start_sidecar(
        policy_file=policy_file, metrics_port=port, metrics_host="127.0.0.1", metric_labels="user", metric_max_tenants=3
    )

    def series() -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        return {
            (s.name, tuple(sorted(s.labels.items())))
            for family in scrape(port).values()
            for s in family.samples
            if not s.name.endswith("_bucket")
        }

    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        client.check(tenant_id="acme", task_id="t0", step_id="s", estimated_input_tokens=1, labels={"user": "u"})
        before = series()

        def check(i: int) -> None:
            labels = {"user": "u", f"unlisted-{i}": str(i)}
            answer = client.check(
                tenant_id="acme", task_id=f"task-{i}", step_id=f"s{i}", estimated_input_tokens=1, labels=labels
            )
            # The series compared are ALLOW's: a fail-mode answer would add its own (a bounded label, not a leak).
            assert (answer.decision, answer.reason) == (pb.DECISION_ALLOW, pb.REASON_WITHIN_BUDGET), answer

        # 2,000 task ids and unlisted label keys, ten times the largest cap the metrics keep (models: 4 x 50 task
        # types): a value that became a label would show as a new series. Several calls in flight, for the time.
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(check, range(2_000)))
        assert series() == before  # no new series
        for i in range(10):
            client.check(tenant_id=f"tenant-{i}", task_id="t", step_id="s", estimated_input_tokens=1)
    tenants = {
        s.labels["budgetwarden_tenant"]
        for s in scrape(port)["budgetwarden_check_decisions"].samples
        if "budgetwarden_tenant" in s.labels
    }
    assert tenants == {"acme", "tenant-0", "tenant-1", "_other"}


def test_semconv_opt_in_switches_to_per_direction_counters(
    start_sidecar: Callable[..., RunningSidecar], policy_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http, gen_ai_latest_experimental")
    port = free_port()
    running = start_sidecar(policy_file=policy_file, metrics_port=port, metrics_host="127.0.0.1")
    expected = scripted(running.addr)
    families = scrape(port)
    assert "gen_ai_client_token_usage" not in families
    assert sample_sum(families, "gen_ai_client_inference_usage_input_tokens", "_total") == expected["input"]
    assert sample_sum(families, "gen_ai_client_inference_usage_output_tokens", "_total") == expected["output"]
    cached = "gen_ai_client_inference_usage_cache_read_input_tokens"
    assert sample_sum(families, cached, "_total", gen_ai_token_modality="unknown") == 100


def test_sdk_disabled_exports_nothing(
    start_sidecar: Callable[..., RunningSidecar], policy_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    port = free_port()
    running = start_sidecar(policy_file=policy_file, metrics_port=port, metrics_host="127.0.0.1")
    scripted(running.addr)
    assert running.sidecar is not None
    assert not running.sidecar.telemetry.enabled
    with pytest.raises(OSError, match="refused"):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
