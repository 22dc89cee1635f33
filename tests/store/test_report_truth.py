"""Issue 11, items 1, 2, 4, 5, 6: a report is priced at the model its step ran on, fail-open usage reaches its task,
a reused idempotency key never hides real usage, an empty report is refused, and a short lease cannot walk a task
past its ceiling (late usage is counted, and the overspend it allows is bounded as docs/concepts.md states)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from redis.asyncio import Redis

from budgetwarden.domain._cost import actual_micros
from budgetwarden.domain._model import CheckInput, Decision, Outcome, Reason, ReportStatus, UsageInput
from budgetwarden.domain._policy import ModelPolicy, PolicyError, parse_policy
from budgetwarden.limiter import Limiter
from budgetwarden.store._keys import fail_open_id, parse_fail_open_id, reservation_id
from budgetwarden.store._store import REPORT_BATCH, BudgetStore, IdempotencyConflictError
from budgetwarden.store._usage import read_events
from budgetwarden.telemetry._metrics import Telemetry
from budgetwarden.transport._validation import InvalidRequestError, usage_inputs
from budgetwarden_api.v1 import budget_pb2 as pb

from support import free_port

NOW = 1_796_000_000_000
TENANT = "acme"
POLICY_TEXT = """
models:
  gpt-4o-mini: {input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.60, cached_input_usd_per_mtok: 0.075}
  gpt-4o: {input_usd_per_mtok: 2.50, output_usd_per_mtok: 10.00, degrade_to: gpt-4o-mini}
default_model: {input_usd_per_mtok: 15, output_usd_per_mtok: 75}
default_task_type: agent
task_types:
  agent:
    per_task: {tokens: 1000000}
  research:
    per_task: {tokens: 1000000}
  small:
    per_task: {tokens: 10000}
  quick:
    per_task: {tokens: 10000}
    min_lease_seconds: 5
"""
POLICY = parse_policy(POLICY_TEXT, "test")


def usage(task: str = "t1", step: str = "s1", **fields: Any) -> UsageInput:
    values: dict[str, Any] = {
        "tenant_id": TENANT,
        "reservation_id": "",
        "task_id": task,
        "step_id": step,
        "task_type": "",
        "model": "",
        "input_tokens": 0,
        "output_tokens": 0,
        "cached_input_tokens": 0,
        "tool_calls": 0,
        "outcome": Outcome.COMPLETED,
        "idempotency_key": "",
        "timestamp_ms": None,
    }
    return UsageInput(**(values | fields))


def check(task: str = "t1", step: str = "s1", **fields: Any) -> CheckInput:
    values: dict[str, Any] = {
        "tenant_id": TENANT,
        "task_id": task,
        "step_id": step,
        "task_type": "",
        "model": "gpt-4o-mini",
        "input_tokens": 1000,
        "output_tokens": 0,
        "tool_calls": 0,
    }
    return CheckInput(**(values | fields))


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def limiter(async_redis: Redis, clock: Clock, metrics: InMemoryMetricReader) -> Limiter:
    telemetry = Telemetry(MeterProvider(metric_readers=[metrics]))
    return Limiter(
        BudgetStore(async_redis),
        lambda: POLICY,
        clock=clock,
        telemetry=telemetry,
        store_deadline_s=30.0,
        check_deadline_s=30.0,
    )


def points(reader: InMemoryMetricReader, name: str) -> list[tuple[dict[str, Any], float]]:
    """(attributes, value) of every data point of a metric."""
    data = reader.get_metrics_data()
    out = []
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    out += [(dict(p.attributes or {}), p.value) for p in metric.data.data_points]  # type: ignore[union-attr]
    return out


async def state(client: Redis) -> dict[str, Any]:
    """Every key's content: to show that a refused call wrote nothing."""
    out: dict[str, Any] = {}
    for key in sorted(await client.keys("*")):
        kind = (await client.type(key)).decode()
        if kind == "hash":
            out[key.decode()] = await client.hgetall(key)
        elif kind == "stream":
            out[key.decode()] = [fields for _, fields in await client.xrange(key)]
        elif kind == "zset":
            out[key.decode()] = await client.zrange(key, 0, -1, withscores=True)
        else:
            out[key.decode()] = await client.get(key)
    return out


# --- 1. a report without a model is priced at its reservation's model --------------------------------------------


async def test_a_report_without_model_is_priced_at_the_model_its_step_was_checked_for(
    limiter: Limiter, sync_redis: redis.Redis, metrics: InMemoryMetricReader
) -> None:
    checked = await limiter.check(check(task_type="research", input_tokens=100_000))
    assert checked.verdict.decision is Decision.ALLOW
    [applied] = await limiter.report([usage(reservation_id=checked.reservation_id, task_id="", step_id="",
                                            input_tokens=100_000)])  # fmt: skip
    # gpt-4o-mini: $0.15 per million input tokens, not default_model's $15.
    assert (applied.status, applied.charged_usd) == (ReportStatus.APPLIED, 15_000)
    assert (applied.model, applied.model_assumed, applied.task_type) == ("gpt-4o-mini", False, "research")
    [event] = list(read_events(sync_redis, TENANT, 0))
    assert (event.data["model"], event.data["cost_usd_micros"], event.data["task_type"]) == (
        "gpt-4o-mini", 15_000, "research")  # fmt: skip
    models = {attrs["gen_ai.request.model"] for attrs, _ in points(metrics, "budgetwarden.tokens.consumed")}
    assert models == {"gpt-4o-mini"}


async def test_a_degraded_step_reports_at_the_model_it_was_degraded_to(limiter: Limiter) -> None:
    """The reservation records the model of the candidate that fitted: after DEGRADE to the cheaper model, a report
    without a model is priced at the cheaper model."""
    policy = parse_policy(
        POLICY_TEXT.replace("  small:\n", "  ladder:\n    per_task: {tokens: 5000}\n    degrade:\n"
                            "      - {name: cheaper, model: cheaper, max_output_tokens: 100}\n  small:\n"),
        "test",
    )  # fmt: skip
    limiter.policy = lambda: policy
    checked = await limiter.check(check(task_type="ladder", model="gpt-4o", input_tokens=4000, output_tokens=2000))
    assert checked.verdict.decision is Decision.DEGRADE
    [applied] = await limiter.report([usage(input_tokens=4000, output_tokens=100)])
    mini = policy.policy.models["gpt-4o-mini"]
    assert applied.model == "gpt-4o-mini"
    assert applied.charged_usd == actual_micros(mini, 4000, 0, 100)


async def test_a_report_naming_a_model_keeps_it_and_one_with_neither_model_nor_reservation_says_assumed(
    limiter: Limiter,
) -> None:
    await limiter.check(check())
    named, assumed = await limiter.report(
        [usage(model="gpt-4o", input_tokens=1000), usage(step="never-checked", input_tokens=1000)]
    )
    assert (named.model, named.model_assumed, named.charged_usd) == ("gpt-4o", False, 2_500)
    # No model and no reservation: the policy's default_model ($15 per million input tokens), and the result says so.
    assert (assumed.status, assumed.model, assumed.model_assumed, assumed.charged_usd) == (
        ReportStatus.UNRESERVED, "", True, 15_000)  # fmt: skip


async def test_a_reservation_checked_without_a_model_prices_its_report_at_the_default_and_says_so(
    limiter: Limiter,
) -> None:
    await limiter.check(check(model=""))
    [applied] = await limiter.report([usage(input_tokens=1000)])
    assert (applied.status, applied.model, applied.model_assumed, applied.charged_usd) == (
        ReportStatus.APPLIED, "", True, 15_000)  # fmt: skip


LUA_COST = resources.files("budgetwarden.store.lua").joinpath("_lib.lua").read_text() + (
    # Returned as a number (an integer reply, exact below 2^53): tostring would print only 14 significant digits.
    "\nreturn cost_micros({tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])},"
    " {tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])})"
)
TOKENS = st.integers(0, 1_000_000_000)
PRICES = st.integers(0, 1_000_000_000_000) | st.integers(0, 2_000_000)  # micro-USD per million tokens


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(uncached=TOKENS, cached=TOKENS, output=TOKENS, p_in=PRICES, p_cached=PRICES, p_out=PRICES)
@example(uncached=0, cached=0, output=544_300_407, p_in=0, p_cached=0, p_out=183_722_074_638)  # a cost past 10^14
def test_lua_pricing_equals_python_pricing(
    sync_redis: redis.Redis, uncached: int, cached: int, output: int, p_in: int, p_cached: int, p_out: int
) -> None:
    """cost_micros (lua/_lib.lua) against actual_micros (_cost.py), up to the policy's largest prices and token counts,
    where the products are far past 2^53."""
    model = ModelPolicy(
        input_usd_per_mtok=p_in / 1e6, cached_input_usd_per_mtok=p_cached / 1e6, output_usd_per_mtok=p_out / 1e6
    )
    prices = (model.input_micros_per_mtok, model.cached_input_micros_per_mtok, model.output_micros_per_mtok)
    assert prices == (p_in, p_cached, p_out)
    lua = sync_redis.eval(LUA_COST, 0, uncached, cached, output, *prices)  # the script only computes
    assert int(lua) == actual_micros(model, uncached + cached, cached, output)


# --- 2. fail-open usage reaches its task ---------------------------------------------------------------------------


@pytest.fixture
def down_limiter(clock: Clock) -> Iterator[Limiter]:
    """A limiter whose Redis refuses connections: every check answers from the fail mode 'open'."""
    client = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=5)
    return Limiter(
        BudgetStore(client), lambda: POLICY, fail_mode="open", clock=clock, store_deadline_s=30.0, check_deadline_s=30.0
    )


async def test_fail_open_usage_is_charged_to_its_task_and_step(down_limiter: Limiter, limiter: Limiter) -> None:
    granted = await down_limiter.check(check(task_type="small", model="gpt-4o", input_tokens=6000))
    assert (granted.verdict.decision, granted.verdict.reason) == (Decision.ALLOW, Reason.FAIL_OPEN)
    grant = parse_fail_open_id(granted.reservation_id)
    assert grant is not None
    assert (grant.task_id, grant.step_id, grant.model) == ("t1", "s1", "gpt-4o")

    # Redis is back: the report names only the id it was given.
    [applied] = await limiter.report([usage(reservation_id=granted.reservation_id, task_id="", step_id="",
                                            input_tokens=6000)])  # fmt: skip
    assert applied.task is not None, "charged to the task it was granted for"
    assert applied.task.used == 6000
    assert (applied.model, applied.task_type, applied.charged_usd) == ("gpt-4o", "small", 15_000)
    assert applied.reservation_id == reservation_id("t1", "s1")

    # A keyless report of the same step (the same record) is the duplicate, not a second charge.
    [again] = await limiter.report([usage(input_tokens=6000)])
    assert again.status is ReportStatus.DUPLICATE
    # And the task's ceiling (10,000) holds: 6,000 are used, 6,000 more do not fit.
    later = await limiter.check(check(step="s2", task_type="small", input_tokens=6000))
    assert later.verdict.granted <= 4000


def test_a_fail_open_id_is_accepted_by_validation_and_refused_when_forged() -> None:
    record = pb.UsageRecord(tenant_id=TENANT, reservation_id=fail_open_id("t1", "s1", "m", "x"), input_tokens=1)
    [parsed] = usage_inputs(pb.ReportRequest(records=[record]), NOW)
    assert parsed.reservation_id.startswith("fo1.")
    for forged in ("fo1.", "fo1.a.b.c", "fo1.{x}.b.c.d", "fo1..czE.bQ.eA"):
        record.reservation_id = forged
        with pytest.raises(InvalidRequestError, match=r"records\[0\]\.reservation_id"):
            usage_inputs(pb.ReportRequest(records=[record]), NOW)
    # What the id carries is held to the rules of the fields it stands for: no field separator smuggled to the script.
    for carried in (fail_open_id("t\x1f1", "s1", "m", "x"), fail_open_id("t1", "s\u202e1", "m", "x"),
                    fail_open_id("t1", "s1", "m" * 300, "x")):  # fmt: skip
        record.reservation_id = carried
        with pytest.raises(InvalidRequestError, match=r"records\[0\]\.reservation_id: is a fail-open id whose"):
            usage_inputs(pb.ReportRequest(records=[record]), NOW)


# --- 4. a reused idempotency key never hides real usage ------------------------------------------------------------


async def test_same_key_same_record_is_a_duplicate_and_another_record_is_refused_writing_nothing(
    limiter: Limiter, async_redis: Redis
) -> None:
    await limiter.check(check(task="A"))
    await limiter.check(check(task="B"))
    [first] = await limiter.report([usage(task="A", input_tokens=300, idempotency_key="k")])
    [retry] = await limiter.report([usage(task="A", input_tokens=300, idempotency_key="k")])
    assert (first.status, retry.status) == (ReportStatus.APPLIED, ReportStatus.DUPLICATE)

    before = await state(async_redis)
    batch = [usage(task="B", step="s9", input_tokens=50, idempotency_key="fresh"),
             usage(task="B", input_tokens=5700, idempotency_key="k")]  # fmt: skip
    with pytest.raises(IdempotencyConflictError) as refused:
        await limiter.report(batch)
    assert (refused.value.index, refused.value.keyless, refused.value.partial) == (1, False, False)
    assert await state(async_redis) == before, "nothing of the refused call was written, not even its first record"
    # B's usage still counts once it comes with its own key.
    [applied] = await limiter.report([replace(batch[1], idempotency_key="k-B")])
    assert applied.status is ReportStatus.APPLIED
    assert applied.charged == 5700


async def test_two_different_records_under_one_key_in_one_batch_are_refused(limiter: Limiter) -> None:
    batch = [usage(input_tokens=10, idempotency_key="k"), usage(input_tokens=10, idempotency_key="k"),
             usage(input_tokens=11, idempotency_key="k")]  # fmt: skip
    with pytest.raises(IdempotencyConflictError) as refused:
        await limiter.report(batch)
    assert refused.value.index == 2


async def test_a_second_keyless_report_of_a_step_with_other_usage_is_refused(limiter: Limiter) -> None:
    await limiter.check(check())
    await limiter.report([usage(input_tokens=100)])
    assert (await limiter.report([usage(input_tokens=100)]))[0].status is ReportStatus.DUPLICATE
    with pytest.raises(IdempotencyConflictError) as refused:
        await limiter.report([usage(input_tokens=900)])
    assert refused.value.keyless


async def test_a_conflict_in_a_request_of_several_calls_says_the_others_may_be_applied(limiter: Limiter) -> None:
    await limiter.report([usage(input_tokens=5, idempotency_key="k")])
    records = [usage(step=f"s{i}", input_tokens=1, idempotency_key=f"k{i}") for i in range(REPORT_BATCH + 1)]
    records.append(usage(input_tokens=6, idempotency_key="k"))
    with pytest.raises(IdempotencyConflictError) as refused:
        await limiter.report(records)
    assert (refused.value.index, refused.value.partial) == (REPORT_BATCH + 1, True)


# --- 5. an empty report is refused ---------------------------------------------------------------------------------


def test_a_completed_record_without_usage_is_invalid_and_points_to_release() -> None:
    empty = pb.UsageRecord(tenant_id=TENANT, task_id="t1", step_id="s1")
    with pytest.raises(InvalidRequestError, match=r"^records\[0\]\.input_tokens: .*Release"):
        usage_inputs(pb.ReportRequest(records=[empty]), NOW)
    for outcome in (pb.OUTCOME_FAILED, pb.OUTCOME_CANCELLED):
        [parsed] = usage_inputs(pb.ReportRequest(records=[replace_outcome(empty, outcome)]), NOW)
        assert parsed.tokens == 0
    [tool_step] = usage_inputs(pb.ReportRequest(records=[pb.UsageRecord(tenant_id=TENANT, task_id="t", step_id="s",
                                                                        tool_calls=2)]), NOW)  # fmt: skip
    assert tool_step.tool_calls == 2


def replace_outcome(message: pb.UsageRecord, outcome: int) -> pb.UsageRecord:
    copy = pb.UsageRecord()
    copy.CopyFrom(message)
    copy.outcome = outcome  # type: ignore[assignment]
    return copy


# --- 6. a short lease cannot walk past the ceiling -----------------------------------------------------------------


async def test_a_short_caller_lease_is_clamped_to_the_minimum_lease(limiter: Limiter, clock: Clock) -> None:
    first = await limiter.check(check(task_type="small", input_tokens=10_000, lease_seconds=1))
    assert first.verdict.granted == 10_000
    assert first.lease_expires_ms == NOW + 60_000, "the policy's default minimum lease"
    clock.now = NOW + 59_999
    second = await limiter.check(check(step="s2", task_type="small", input_tokens=10_000, lease_seconds=1))
    assert second.verdict.granted == 0, "the first grant still holds the whole ceiling"
    clock.now = NOW + 60_000
    third = await limiter.check(check(step="s3", task_type="small", input_tokens=10_000, lease_seconds=1))
    assert third.verdict.granted == 10_000, "lapsed: its budget is free again"
    quick = await limiter.check(check(task="q", task_type="quick", input_tokens=10, lease_seconds=1))
    assert quick.lease_expires_ms == clock.now + 5_000, "a task type's own minimum"
    longer = await limiter.check(check(task="q", step="s2", task_type="quick", input_tokens=10, lease_seconds=90))
    assert longer.lease_expires_ms == clock.now + 90_000, "a longer caller lease stays as asked"


@pytest.mark.parametrize("min_lease_s", [60, 17])
async def test_late_usage_is_counted_and_the_overspend_stays_within_the_stated_bound(
    async_redis: Redis, clock: Clock, metrics: InMemoryMetricReader, min_lease_s: int
) -> None:
    """An agent that asks for the whole ceiling every 5 s with a 1 s lease and reports nothing until the end: the
    grants over T seconds stay within C * (floor(T / L) + 1) (docs/concepts.md, "Short leases ..."), the late reports
    are all counted, and each is marked late (budgetwarden.usage.late_tokens)."""
    policy = parse_policy(POLICY_TEXT + f"min_lease_seconds: {min_lease_s}\n", "test")
    telemetry = Telemetry(MeterProvider(metric_readers=[metrics]))
    limiter = Limiter(
        BudgetStore(async_redis),
        lambda: policy,
        clock=clock,
        telemetry=telemetry,
        store_deadline_s=30.0,
        check_deadline_s=30.0,
    )
    ceiling, span_s = 10_000, 300
    granted: list[tuple[str, int]] = []
    for t in range(0, span_s + 1, 5):
        clock.now = NOW + t * 1000
        result = await limiter.check(check(step=f"s{t}", task_type="small", input_tokens=ceiling, lease_seconds=1))
        if result.verdict.granted:
            granted.append((f"s{t}", result.verdict.granted))
    bound = ceiling * (span_s // min_lease_s + 1)
    total = sum(tokens for _, tokens in granted)
    assert ceiling < total <= bound

    clock.now = NOW + (span_s + min_lease_s) * 1000  # every lease has lapsed
    applied = await limiter.report([usage(step=step, input_tokens=tokens) for step, tokens in granted])
    assert all(item.late and item.status is ReportStatus.UNRESERVED for item in applied)
    assert applied[-1].task is not None
    assert applied[-1].task.used == total <= bound
    assert sum(value for _, value in points(metrics, "budgetwarden.usage.late_tokens")) == total
    # Once the late usage is in, the task is past its ceiling: nothing more is granted.
    after = await limiter.check(check(step="after", task_type="small", input_tokens=1, lease_seconds=1))
    assert after.verdict.granted == 0


async def test_usage_within_its_lease_is_not_late(limiter: Limiter, metrics: InMemoryMetricReader) -> None:
    await limiter.check(check())
    [applied] = await limiter.report([usage(input_tokens=10)])
    assert not applied.late
    assert points(metrics, "budgetwarden.usage.late_tokens") == []


def test_policy_minimum_leases_are_validated(tmp_path: Path) -> None:
    assert POLICY.policy.min_lease("small") == 60
    assert POLICY.policy.min_lease("quick") == 5
    assert POLICY.policy.min_lease("no-such-type") == 60
    bad = [("min_lease_seconds: 0\n", "min_lease_seconds"),
           ("task_types:\n  a:\n    min_lease_seconds: -5\n", "task_types.a.min_lease_seconds")]  # fmt: skip
    for text, where in bad:
        with pytest.raises(PolicyError, match=where):
            parse_policy(text, "bad")
