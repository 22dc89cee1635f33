"""What the metrics say is what happened: no attribute exported as "", a cost counter named by the conventions, a
stable service.instance.id, counters at 0 before they fire, tenant gauges a sidecar may leave to others, and a scrape
endpoint on loopback that answers every scraper."""

from __future__ import annotations

import asyncio
import gzip
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families

from budgetwarden.app._config import Settings
from budgetwarden.telemetry import ReportedUsage, Telemetry
from budgetwarden.telemetry._metrics import resource_from_env
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
SCRAPES = 300  # concurrent scrapes, many times a listen backlog of 5


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return str(response.read().decode())


def samples(port: int) -> list[Any]:
    return [sample for family in text_string_to_metric_families(scrape_text(port)) for sample in family.samples]


def test_unknown_attributes_are_left_out() -> None:
    """No model, no task type, no provider: those attributes are absent, not "" (in OTLP "" is a value of its own; the
    end-to-end version is test_telemetry.py::test_unknown_attributes_are_left_out_of_the_export)."""
    reader = InMemoryMetricReader()
    telemetry = Telemetry(MeterProvider(metric_readers=[reader]))
    telemetry.check(
        tenant_id="acme", task_type="", model="", decision="ALLOW", reason="FITS", reserved_tokens=100, fail_mode=None,
        seconds=0.001, labels={},
    )  # fmt: skip
    telemetry.reported(
        [
            ReportedUsage(
                tenant_id="acme", task_type="", model="", provider="", status="unreserved", input_tokens=10,
                cached_input_tokens=0, output_tokens=0, cost_usd_micros=0, refunded_tokens=0,
            )
        ]
    )  # fmt: skip
    data = reader.get_metrics_data()
    assert data is not None
    points = [
        (m.name, dict(p.attributes or {}))
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        for p in m.data.data_points
    ]
    with_tenant = [(name, attributes) for name, attributes in points if "budgetwarden.tenant" in attributes]
    assert {name for name, _ in with_tenant} >= {"budgetwarden.check.decisions", "budgetwarden.tokens.consumed"}
    assert not [(name, a) for name, a in points if "" in a.values()]
    assert not [(name, a) for name, a in points if {"gen_ai.request.model", "budgetwarden.task_type"} & a.keys()]


def test_cost_counter_follows_the_naming_conventions(
    start_sidecar: Callable[..., RunningSidecar], policy_file: Path
) -> None:
    port = free_port()
    running = start_sidecar(policy_file=policy_file, metrics_port=port)
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        client.check(tenant_id="acme", task_id="t", step_id="s", model="gpt-x", estimated_input_tokens=1000)
        client.report([pb.UsageRecord(tenant_id="acme", task_id="t", step_id="s", model="gpt-x", input_tokens=1000)])
    cost = [s for s in samples(port) if "cost" in s.name]
    assert [s.name for s in cost] == ["budgetwarden_cost_consumed_usd_total"]
    assert cost[0].value == pytest.approx(1000 * 10 / 1e6)


def test_cost_counter_otel_name_and_unit() -> None:
    """As OTLP carries it: the currency in the name, the unit a UCUM annotation (which exporters leave out of names)."""
    reader = InMemoryMetricReader()
    telemetry = Telemetry(MeterProvider(metric_readers=[reader]))
    telemetry.reported(
        [
            ReportedUsage(
                tenant_id="acme", task_type="agent", model="gpt-x", provider="openai", status="applied",
                input_tokens=1000, cached_input_tokens=0, output_tokens=0, cost_usd_micros=10_000, refunded_tokens=0,
            )
        ]
    )  # fmt: skip
    data = reader.get_metrics_data()
    assert data is not None
    metrics = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert "budgetwarden.cost.consumed" not in metrics
    assert metrics["budgetwarden.cost.consumed_usd"].unit == "{USD}"
    assert metrics["budgetwarden.cost.consumed_usd"].data.data_points[0].value == pytest.approx(0.01)


def test_service_instance_id_is_the_pod_uid_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    pod_uid = "8b5e4f7c-2a1d-4c3e-9f60-1e2d3c4b5a69"
    in_pod = resource_from_env({"POD_UID": pod_uid, "POD_NAME": "agent-0"}).attributes
    assert in_pod["service.instance.id"] == pod_uid
    assert in_pod["k8s.pod.uid"] == pod_uid
    # The same pod, a restarted container: the same series.
    assert resource_from_env({"POD_UID": pod_uid}).attributes["service.instance.id"] == pod_uid
    # Outside Kubernetes: a random UUID per start.
    first = resource_from_env({}).attributes["service.instance.id"]
    assert uuid.UUID(str(first)).version == 4
    # The operator's OTEL_RESOURCE_ATTRIBUTES wins over both.
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=mine,deployment.environment=test")
    chosen = resource_from_env({"POD_UID": pod_uid}).attributes
    assert chosen["service.instance.id"] == "mine"
    assert chosen["deployment.environment"] == "test"


def test_service_instance_id_reaches_the_scrape(
    start_sidecar: Callable[..., RunningSidecar], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POD_UID", "0f1e2d3c-4b5a-4968-8776-655443322110")
    port = free_port()
    start_sidecar(metrics_port=port)
    info = [s for s in samples(port) if s.name == "target_info"]
    assert info, "no target_info"
    assert info[0].labels["service_instance_id"] == "0f1e2d3c-4b5a-4968-8776-655443322110"


def test_counters_that_have_not_fired_exist_at_zero(start_sidecar: Callable[..., RunningSidecar]) -> None:
    port = free_port()
    start_sidecar(metrics_port=port)  # no check, no reload, no fail mode yet
    found = {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if not k.startswith("otel_scope_")))): s.value
        for s in samples(port)
        if s.name in ("budgetwarden_check_fail_mode_total", "budgetwarden_policy_reloads_total")
    }
    assert found == {
        ("budgetwarden_check_fail_mode_total", (("budgetwarden_fail_mode", "closed"),)): 0,
        ("budgetwarden_check_fail_mode_total", (("budgetwarden_fail_mode", "open"),)): 0,
        ("budgetwarden_policy_reloads_total", (("budgetwarden_policy_result", "applied"),)): 0,
        ("budgetwarden_policy_reloads_total", (("budgetwarden_policy_result", "rejected"),)): 0,
    }


def test_fail_mode_counts_up_from_its_zero(start_sidecar: Callable[..., RunningSidecar]) -> None:
    port = free_port()
    running = start_sidecar(metrics_port=port, redis_url=f"redis://127.0.0.1:{free_port()}/0", check_deadline_ms=2000)
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        assert client.check(tenant_id="acme", task_id="t", step_id="s", estimated_input_tokens=1).from_fail_mode
    counted = {
        s.labels["budgetwarden_fail_mode"]: s.value
        for s in samples(port)
        if s.name == "budgetwarden_check_fail_mode_total"
    }
    assert counted == {"closed": 1, "open": 0}


def test_a_sidecar_can_leave_the_tenant_gauges_to_others(
    start_sidecar: Callable[..., RunningSidecar], policy_file: Path
) -> None:
    ports = free_port(), free_port()
    exporting = start_sidecar(policy_file=policy_file, metrics_port=ports[0])
    quiet = start_sidecar(policy_file=policy_file, metrics_port=ports[1], metrics_tenant_gauges=False)
    for running in (exporting, quiet):
        with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
            client.check(tenant_id="acme", task_id="t", step_id=running.addr, estimated_input_tokens=100)
    gauges = ("budgetwarden_budget_remaining", "budgetwarden_reservations_active")
    assert {s.name for s in samples(ports[0])} >= set(gauges)
    quiet_names = {s.name for s in samples(ports[1])}
    assert not quiet_names & set(gauges)
    assert "budgetwarden_check_decisions_total" in quiet_names  # its own counters still go out
    assert quiet.sidecar is not None
    assert quiet.sidecar._gauges is None  # and it holds no Redis connection for them


def listening_address(port: int) -> str:
    """The local address a TCP socket listens on at ``port``, from /proc/net/tcp (IPv4)."""
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            local, state = line.split()[1], line.split()[3]
            host, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                return socket.inet_ntoa(bytes.fromhex(host)[::-1])
    raise AssertionError(f"nothing listens on port {port}")


def test_metrics_endpoint_listens_on_loopback_by_default(start_sidecar: Callable[..., RunningSidecar]) -> None:
    assert Settings().metrics_host == "127.0.0.1"
    port = free_port()
    start_sidecar(metrics_port=port)
    assert listening_address(port) == "127.0.0.1"
    other = free_port()
    start_sidecar(metrics_port=other, metrics_host="0.0.0.0")
    assert listening_address(other) == "0.0.0.0"


def listen_backlog(port: int) -> int:
    """The accept-queue length a listening socket was given (``ss`` shows it as Send-Q of a LISTEN socket)."""
    ss = shutil.which("ss") or shutil.which("ss", path="/usr/sbin:/sbin:/usr/bin:/bin")
    assert ss, "this test reads the listen backlog with `ss` (Debian's iproute2 package)"
    lines = subprocess.run([ss, "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in lines.splitlines() if line.strip()]
    assert len(rows) == 1, lines
    return int(rows[0][2])


def test_metrics_endpoint_queues_a_burst_of_connections(start_sidecar: Callable[..., RunningSidecar]) -> None:
    """Not the standard library server's backlog of 5, past which the kernel drops a scraper's connection attempts."""
    port = free_port()
    start_sidecar(metrics_port=port)
    assert listen_backlog(port) >= SCRAPES


def test_metrics_endpoint_speaks_what_scrapers_ask_for(start_sidecar: Callable[..., RunningSidecar]) -> None:
    port = free_port()
    start_sidecar(metrics_port=port)
    url = f"http://127.0.0.1:{port}/metrics"
    asks = {"Accept": "application/openmetrics-text;version=1.0.0", "Accept-Encoding": "gzip"}
    with urllib.request.urlopen(urllib.request.Request(url, headers=asks), timeout=30) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert response.headers["Content-Encoding"] == "gzip"
        text = gzip.decompress(response.read()).decode()
    assert "budgetwarden_check_fail_mode_total" in text
    assert text.endswith("# EOF\n")
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/elsewhere", timeout=30)
    with pytest.raises(urllib.error.HTTPError, match="405"):
        urllib.request.urlopen(urllib.request.Request(url, method="POST", data=b"x"), timeout=30)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as garbage:
        garbage.sendall(b"hello\r\n\r\n")
        assert garbage.recv(100).startswith(b"HTTP/1.1 400 ")
    assert scrape_text(port)  # still serving


def test_metrics_endpoint_answers_every_concurrent_scrape(
    start_sidecar: Callable[..., RunningSidecar], policy_file: Path
) -> None:
    """Hundreds of scrapers connect at once and each gets the whole exposition: none is refused, reset or left
    without an answer. Each connection is opened before any request is sent, so they all wait in the accept queue."""
    port = free_port()
    running = start_sidecar(policy_file=policy_file, metrics_port=port)
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        client.check(tenant_id="acme", task_id="t", step_id="s", model="gpt-x", estimated_input_tokens=100)

    async def hammer() -> list[bytes]:
        connections = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", port) for _ in range(SCRAPES)), return_exceptions=True
        )
        failed = [c for c in connections if isinstance(c, BaseException)]
        assert not failed, f"{len(failed)} of {SCRAPES} connections failed: {failed[:3]}"
        opened = [c for c in connections if not isinstance(c, BaseException)]

        async def scrape(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            await writer.drain()
            answer = await reader.read()
            writer.close()
            return answer

        async with asyncio.timeout(120):  # a bound on a hang, not a speed limit
            return await asyncio.gather(*(scrape(r, w) for r, w in opened))

    answers = asyncio.run(hammer())
    assert len(answers) == SCRAPES
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert re.match(rb"HTTP/1\.[01] 200 ", head), head[:200]
        assert b"budgetwarden_check_decisions_total" in body
