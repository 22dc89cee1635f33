"""Usage events end to end: what reports write to the stream, exported as CloudEvents and read back; ReportStream."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from budgetwarden.store._usage import EVENT_TYPE, event_id, read_events
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_api.v1 import budget_pb2_grpc as pb_grpc
from budgetwarden_client import BudgetClient

from support import TEST_RPC_TIMEOUT_S, RunningSidecar
from support import run_cli as cli

POLICY = """
default_tenant: {windows: {day: {tokens: 1000000}}}
models:
  big: {input_usd_per_mtok: 10, cached_input_usd_per_mtok: 2.5, output_usd_per_mtok: 30, degrade_to: small}
  small: {input_usd_per_mtok: 1, output_usd_per_mtok: 4}
default_task_type: agent
task_types:
  agent:
    per_task: {tokens: 10000}
    soft_threshold: 0.5
    degrade: [{name: cheaper, model: cheaper}]
  research: {}
"""


@pytest.fixture
def running(start_sidecar: Callable[..., RunningSidecar], tmp_path: Path) -> RunningSidecar:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    return start_sidecar(policy_file=policy)


@pytest.fixture
def client(running: RunningSidecar) -> Iterator[BudgetClient]:
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as c:
        yield c


def record(step: str, tokens: int, **fields: Any) -> pb.UsageRecord:
    values: dict[str, Any] = {"tenant_id": "acme", "task_id": "t1", "step_id": step, "model": "big"}
    values |= {"input_tokens": tokens} | fields
    return pb.UsageRecord(**values)


def test_reports_write_one_event_each(running: RunningSidecar, client: BudgetClient, sync_redis: redis.Redis) -> None:
    client.check(tenant_id="acme", task_id="t1", step_id="s1", model="big", estimated_input_tokens=3000)
    degraded = client.check(tenant_id="acme", task_id="t1", step_id="s2", model="big", estimated_input_tokens=3000)
    assert degraded.decision == pb.DECISION_DEGRADE
    first = record("s1", 2000, cached_input_tokens=500, output_tokens=100, idempotency_key="k1", labels={"team": "a"})
    at = running.clock() - 60_000  # a minute before the sidecar's now
    first.timestamp.FromMilliseconds(at)
    client.report([first, first])  # the second is a duplicate: no second event
    client.report([record("s2", 2500, model="small")])  # keyless
    client.report([record("nowhere", 10, task_id="t2", task_type="research", outcome=pb.OUTCOME_FAILED)])
    events = list(read_events(sync_redis, "acme", 0))
    assert len(events) == 3
    one, two, three = (e.data for e in events)
    assert events[0].id == event_id("acme", "k1")
    assert one["status"] == "applied"
    assert one["admitted_by"] == "ALLOW"
    assert (one["input_tokens"], one["cached_input_tokens"], one["output_tokens"]) == (2000, 500, 100)
    assert one["cost_usd_micros"] == 1500 * 10 + 500 * 2.5 + 100 * 30
    assert (one["labels"], one["time_ms"], one["outcome"], one["task_type"]) == (
        {"team": "a"},
        at,
        "completed",
        "agent",
    )
    assert (two["admitted_by"], two["status"], two["model"]) == ("DEGRADE:cheaper", "applied", "small")
    assert re.fullmatch(r"[0-9a-f]{32}-1", events[1].id)  # keyless: reservation id and generation
    assert (three["status"], three["admitted_by"], three["task_type"], three["outcome"]) == (
        "unreserved",
        "NONE",
        "research",
        "failed",
    )


REQUIRED = {"specversion": str, "id": str, "source": str, "type": str}
OPTIONAL = {"subject": str, "time": str, "datacontenttype": str}


def assert_cloudevent(event: dict[str, Any]) -> None:
    """The CloudEvents 1.0 JSON format rules that apply to these events."""
    for name, kind in REQUIRED.items():
        assert isinstance(event.get(name), kind), name
        assert event[name], name  # required string attributes are non-empty
    assert event["specversion"] == "1.0"
    for name, kind in OPTIONAL.items():
        assert isinstance(event[name], kind), name
    for name in event:
        assert re.fullmatch(r"[a-z0-9]+", name), f"attribute names are lower-case alphanumeric: {name}"
    datetime.fromisoformat(event["time"].replace("Z", "+00:00"))  # RFC 3339
    assert event["time"].endswith("Z")
    assert event["datacontenttype"] == "application/json"
    assert isinstance(event["data"], dict)


def test_export_is_cloudevents_and_reimports(client: BudgetClient, redis_url: str, tmp_path: Path) -> None:
    sent = [record(f"s{i}", 100 + i, idempotency_key=f"key-{i}", labels={"user": f"u{i % 3}"}) for i in range(25)]
    client.report(sent)
    out = tmp_path / "usage.jsonl"
    result = cli("usage", "export", "--since", "1h", "--tenant", "acme", "--redis-url", redis_url, "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "exported 25 usage events"
    lines = out.read_text().splitlines()
    events = [json.loads(line) for line in lines]
    for event in events:
        assert_cloudevent(event)
        assert event["type"] == EVENT_TYPE
        assert event["source"] == "/budgetwarden/tenants/acme"
        assert event["subject"] == "t1"
    # Re-imported: the ids are the stable ones of the records' keys, and the data adds up to what was reported.
    assert [e["id"] for e in events] == [event_id("acme", f"key-{i}") for i in range(25)]
    assert sum(e["data"]["input_tokens"] for e in events) == sum(r.input_tokens for r in sent)
    again = cli("usage", "export", "--since", "0", "--redis-url", redis_url)  # every tenant, to stdout
    assert [json.loads(line)["id"] for line in again.stdout.splitlines()] == [e["id"] for e in events]
    future = cli("usage", "export", "--since", "2999-01-01T00:00:00Z", "--redis-url", redis_url)
    assert (future.stdout, future.returncode) == ("", 0)


def test_summary_groups_tokens_and_cost(client: BudgetClient, redis_url: str) -> None:
    client.report([record(f"s{i}", 1000, idempotency_key=f"k{i}", labels={"user": f"u{i % 2}"}) for i in range(4)])
    client.report([record("x", 500, model="small", idempotency_key="kx")])
    by_model = cli("usage", "summary", "--tenant", "acme", "--by", "model", "--redis-url", redis_url)
    assert by_model.returncode == 0, by_model.stderr
    rows = {line.split()[0]: line.split()[1:] for line in by_model.stdout.splitlines()[1:]}
    assert rows["big"] == ["4", "4000", "0", "0", "4000", "0.040000"]
    assert rows["small"] == ["1", "500", "0", "0", "500", "0.000500"]
    by_label = cli("usage", "summary", "--tenant", "acme", "--by", "label:user", "--redis-url", redis_url)
    labels = {line.split()[0]: line.split()[1] for line in by_label.stdout.splitlines()[1:]}
    assert labels == {"u0": "2", "u1": "2", "(none)": "1"}
    bad = cli("usage", "summary", "--tenant", "acme", "--by", "colour", "--redis-url", redis_url)
    assert bad.returncode == 1
    assert "--by 'colour'" in bad.stderr


def test_usage_commands_errors(redis_url: str, tmp_path: Path) -> None:
    bad_time = cli("usage", "export", "--since", "yesterday", "--redis-url", redis_url)
    assert (bad_time.returncode, len(bad_time.stderr.splitlines())) == (1, 1)
    assert "--since 'yesterday'" in bad_time.stderr
    no_server = cli("usage", "export", "--since", "0", "--data-dir", str(tmp_path))
    assert no_server.returncode == 1
    assert "cannot read usage events from Redis" in no_server.stderr


def test_report_stream(running: RunningSidecar, client: BudgetClient, sync_redis: redis.Redis) -> None:
    client.check(tenant_id="acme", task_id="t1", step_id="s0", model="big", estimated_input_tokens=100)
    messages = [
        pb.ReportStreamRequest(records=[record(f"s{i}", 10, idempotency_key=f"m{i}") for i in range(j, j + 10)])
        for j in range(0, 30, 10)
    ]
    messages.append(pb.ReportStreamRequest(records=[record("s3", 10, idempotency_key="m3")]))  # a resend
    with grpc.insecure_channel(running.addr) as channel:
        stub = pb_grpc.BudgetServiceStub(channel)
        answer = stub.ReportStream(iter(messages), timeout=10)
        assert (answer.records, answer.applied, answer.duplicate, answer.unreserved) == (31, 1, 1, 29)
        bad = [messages[0], pb.ReportStreamRequest(records=[record("z", -1)])]
        with pytest.raises(grpc.RpcError) as caught:
            stub.ReportStream(iter(bad), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 1: records[0].input_tokens: must not be negative" in caught.value.details()
    assert len(list(read_events(sync_redis, "acme", 0))) == 30
