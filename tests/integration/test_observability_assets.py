"""The collector config and the Grafana dashboard match what the sidecar really sends."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from budgetwarden_client import BudgetClient, pb

from support import TEST_RPC_TIMEOUT_S, RunningSidecar, free_port

ROOT = Path(__file__).resolve().parents[2]


def test_collector_config_receives_otlp_and_serves_prometheus() -> None:
    config = yaml.safe_load((ROOT / "k8s" / "base" / "otel-collector-config.yaml").read_text())
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    assert protocols["http"]["endpoint"].endswith(":4318")
    pipeline = config["service"]["pipelines"]["metrics"]
    assert pipeline["receivers"] == ["otlp"]
    assert "batch" in pipeline["processors"]
    assert all(name in config["processors"] for name in pipeline["processors"])
    assert pipeline["exporters"] == ["prometheus"]
    assert config["exporters"]["prometheus"]["endpoint"].endswith(":8889")


def scraped_names(port: int) -> set[str]:
    """Every sample name and label name the endpoint serves."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    samples = [sample for family in families for sample in family.samples]
    return {sample.name for sample in samples} | {label for sample in samples for label in sample.labels}


def test_dashboard_uses_only_metrics_the_sidecar_emits(start_sidecar: Callable[..., RunningSidecar]) -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    exprs.append(dashboard["templating"]["list"][1]["query"]["query"])
    used = {name for expr in exprs for name in re.findall(r"\b(?:budgetwarden|gen_ai)_[A-Za-z_]+", expr)}
    assert len(used) >= 15  # metric and label names

    healthy_port, failing_port = free_port(), free_port()
    healthy = start_sidecar(metrics_port=healthy_port)
    failing = start_sidecar(metrics_port=failing_port, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with BudgetClient(healthy.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        client.check(tenant_id="acme", task_id="t", step_id="s1", model="gpt-x", estimated_input_tokens=500)
        client.check(tenant_id="acme", task_id="t", step_id="s2", model="gpt-x", estimated_input_tokens=500)
        client.report([pb.UsageRecord(tenant_id="acme", task_id="t", step_id="s1", model="gpt-x", input_tokens=100)])
    with BudgetClient(failing.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        assert client.check(tenant_id="acme", task_id="t", step_id="s", estimated_input_tokens=1).from_fail_mode
    emitted = scraped_names(healthy_port) | scraped_names(failing_port)
    missing = {name for name in used if name not in emitted}
    assert not missing, f"the dashboard queries metrics the sidecar does not emit: {sorted(missing)}"
