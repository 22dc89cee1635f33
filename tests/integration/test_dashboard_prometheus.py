"""The Grafana dashboard's queries, run by a real Prometheus (Debian's `prometheus` package; `make test` installs it)
against a real scrape of two sidecars that share one Redis, as an agent fleet's sidecars do."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import BudgetClient

from support import TEST_RPC_TIMEOUT_S, RunningSidecar, SettableClock, free_port

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
DAY_LIMIT = 1_000_000
POLICY = f"""
default_tenant: {{windows: {{day: {{tokens: {DAY_LIMIT}}}}}}}
models:
  gpt-x: {{input_usd_per_mtok: 10, output_usd_per_mtok: 30, provider: openai}}
default_task_type: agent
task_types:
  agent: {{per_task: {{tokens: 100000}}, per_step: {{tokens: 5000}}}}
"""
# What Grafana puts in place of the dashboard's variables: the tenant variable's "All" value, a rate window that
# holds several scrapes at the test's scrape interval.
VARIABLES = {"$tenant": ".*", "$__rate_interval": "1m"}
WAIT_S = 120  # a bound, not a pace: Prometheus scrapes every second; a loaded machine may be slow to start it


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin:/usr/sbin")
    assert found, (
        "these tests need a real Prometheus server: Debian's `prometheus` package (`apt-get install prometheus`; "
        "`make test` installs it when it is missing)"
    )
    return found


class Prometheus:
    """A Prometheus server of our own: scrapes the given targets every second, answers on a loopback port."""

    def __init__(self, tmp_path: Path, targets: list[int]) -> None:
        self.port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "budgetwarden",
                            "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in targets]}],
                        }
                    ],
                }
            )
        )
        self.log = tmp_path / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    prometheus_binary(),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return list(data["result"])

    def wait(self, condition: Callable[[], bool], what: str, detail: Callable[[], object] = lambda: "") -> None:
        """Until ``condition()`` holds; past the bound, fail with ``detail()`` and Prometheus' log."""
        deadline = time.monotonic() + WAIT_S
        while True:
            assert self.process.poll() is None, f"prometheus exited:\n{self.log.read_text()}"
            try:
                if condition():
                    return
            except OSError:  # not listening yet
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {detail()}\n{self.log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL as Grafana sends it) for every target of every panel."""
    out = []
    for panel in DASHBOARD["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: a variable the test does not fill in: {expr}"
            out.append((panel["title"], expr))
    return out


@pytest.fixture
def fleet(start_sidecar: Callable[..., RunningSidecar], tmp_path: Path) -> Iterator[tuple[Prometheus, int]]:
    """Two sidecars on one Redis (one clock, as on one machine) serving tenant acme, scraped by a real Prometheus.
    Yields it and the tokens left in acme's day window."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    clock = SettableClock()
    ports = [free_port(), free_port()]
    sidecars = [start_sidecar(policy_file=policy, metrics_port=port, clock=clock) for port in ports]
    for n, sidecar in enumerate(sidecars):
        with BudgetClient(sidecar.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
            for step in ("s1", "s2"):
                answer = client.check(
                    tenant_id="acme", task_id=f"t{n}", step_id=step, model="gpt-x", estimated_input_tokens=1000,
                    max_output_tokens=200,
                )  # fmt: skip
                assert answer.decision == pb.DECISION_ALLOW
            # s1 used less than it held (a refund); s2 is still held (an active reservation).
            used = pb.UsageRecord(
                tenant_id="acme", task_id=f"t{n}", step_id="s1", model="gpt-x", input_tokens=800, output_tokens=100
            )
            client.report([used])
    # Per sidecar: 900 used, 1200 held by s2.
    remaining = DAY_LIMIT - 2 * (900 + 1200)
    prometheus = Prometheus(tmp_path, ports)
    try:
        yield prometheus, remaining
    finally:
        prometheus.stop()


def test_every_dashboard_query_answers_from_a_real_scrape(fleet: tuple[Prometheus, int]) -> None:
    prometheus, _ = fleet
    queries = dashboard_queries()
    assert len(queries) >= 14
    prometheus.wait(lambda: len(prometheus.query("up == 1")) == 2, "Prometheus to scrape both sidecars")

    def empty() -> list[tuple[str, str]]:
        return [(title, expr) for title, expr in queries if not prometheus.query(expr)]

    # Rates need two scrapes in their window; then every panel has data: no "No data", fail mode and reloads included.
    prometheus.wait(lambda: not empty(), "every dashboard query to return data", lambda: f"no data from {empty()}")
    variable = DASHBOARD["templating"]["list"][1]["query"]["query"]
    match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable)
    assert match, variable
    metric, label = match.groups()
    assert prometheus.api(f"label/{label}/values", **{"match[]": metric}) == ["acme"]


def test_tenant_wide_gauges_add_up_across_sidecars(fleet: tuple[Prometheus, int]) -> None:
    """Both sidecars export acme's remaining budget (the same value, read from Redis); the dashboard shows it once."""
    prometheus, remaining = fleet
    prometheus.wait(
        lambda: len(prometheus.query('budgetwarden_budget_remaining{budgetwarden_window="day"}')) == 2,
        "both sidecars' remaining-budget series",
    )
    exported = prometheus.query('budgetwarden_budget_remaining{budgetwarden_window="day"}')
    assert [float(series["value"][1]) for series in exported] == [remaining, remaining]

    panels = {title: expr for title, expr in dashboard_queries()}
    shown = prometheus.query(panels["Remaining budget per tenant window (tokens)"])
    assert [(s["metric"], float(s["value"][1])) for s in shown] == [
        ({"budgetwarden_tenant": "acme", "budgetwarden_window": "day"}, remaining)
    ]
    active = prometheus.query(panels["Active reservations"])
    assert [(s["metric"], float(s["value"][1])) for s in active] == [({"budgetwarden_tenant": "acme"}, 2)]


def metric_kind(expr: str) -> str:
    """What a query measures, by the metrics it reads: seconds, tokens, dollars, or a count of events."""
    names = set(re.findall(r"\b(?:budgetwarden|gen_ai)_\w+(?=[{[])", expr))  # metrics, not label names
    assert names, expr
    kinds = set()
    for name in names:
        if name.endswith(("_seconds_bucket", "_seconds")):
            kinds.add("seconds")
        elif "_usd" in name:
            kinds.add("usd")
        elif "token" in name or "budget_remaining" in name:
            kinds.add("tokens")
        else:
            kinds.add("events")
    assert len(kinds) == 1, f"a query that mixes {kinds}: {expr}"
    return kinds.pop()


def test_no_panel_mixes_units_on_one_axis() -> None:
    for panel in DASHBOARD["panels"]:
        kinds = {metric_kind(target["expr"]) for target in panel["targets"]}
        assert len(kinds) == 1, f"{panel['title']!r} draws {sorted(kinds)} on one axis"
        unit = panel["fieldConfig"]["defaults"]["unit"]
        assert (unit == "s") == (kinds == {"seconds"}), f"{panel['title']!r}: unit {unit} for {kinds}"
