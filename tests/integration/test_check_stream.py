"""CheckStream over a real socket: what only the stream has. Every test of unary Check in test_grpc.py also runs
through a one-check stream (its ``client`` fixture), and test_check_many.py holds batches to the decisions of single
checks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import redis
from test_grpc import STRICT_POLICY

from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_api.v1 import budget_pb2_grpc as pb_grpc
from budgetwarden_client import AsyncBudgetClient, BudgetClient, CheckRefusedError

from support import TEST_RPC_TIMEOUT_S, BlackHole, RunningSidecar

CHECK_STREAM = "/budgetwarden.v1.BudgetService/CheckStream"


@pytest.fixture
def strict(start_sidecar: Callable[..., RunningSidecar], tmp_path: Any) -> RunningSidecar:
    path = tmp_path / "policy.yaml"
    path.write_text(STRICT_POLICY)  # acme only: 1000 tokens per task, 600 per step
    return start_sidecar(policy_file=path)


@pytest.fixture
def client(strict: RunningSidecar) -> Iterator[BudgetClient]:
    with BudgetClient(strict.addr, timeout=TEST_RPC_TIMEOUT_S) as c:
        yield c


def check(step: str, tokens: int, **fields: Any) -> dict[str, Any]:
    return {"tenant_id": "acme", "task_id": "t1", "step_id": step, "estimated_input_tokens": tokens, **fields}


def test_a_message_is_decided_in_order(client: BudgetClient) -> None:
    first, second, again, third = client.check_many(
        [check("s1", 500), check("s2", 600), check("s1", 500), check("s3", 400)]
    )
    assert isinstance(first, pb.CheckResponse)
    assert isinstance(second, pb.CheckResponse)
    assert isinstance(again, pb.CheckResponse)
    assert isinstance(third, pb.CheckResponse)
    assert first.decision == pb.DECISION_ALLOW
    assert (second.decision, second.reason) == (pb.DECISION_DENY, pb.REASON_TASK_BUDGET_EXHAUSTED)  # 1100 > 1000
    assert (again.replayed, again.reservation_id) == (True, first.reservation_id)
    assert third.decision == pb.DECISION_ALLOW  # 900 of 1000
    task = {s.name: s for s in third.scopes}["task"]
    assert (task.reserved_tokens, task.remaining_tokens) == (900, 100)
    assert client.get_budget(tenant_id="acme", task_id="t1").active_reservations == 2


def test_a_refused_check_gets_its_own_error_and_the_others_go_on(client: BudgetClient, sync_redis: redis.Redis) -> None:
    answers = client.check_many(
        [check("s1", 100), check("s2", 100, tenant_id=""), check("s3", -5), check("s4", 100, tenant_id="nobody")]
    )
    ok, no_tenant, negative, unknown = answers
    assert isinstance(ok, pb.CheckResponse)
    assert ok.decision == pb.DECISION_ALLOW
    assert isinstance(no_tenant, CheckRefusedError)
    assert isinstance(negative, CheckRefusedError)
    assert no_tenant.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert no_tenant.details() == "checks[1].tenant_id: is required"
    assert negative.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert negative.details() == "checks[2].estimated_input_tokens: must not be negative (got -5)"
    assert isinstance(unknown, pb.CheckResponse)
    assert unknown.reason == pb.REASON_UNKNOWN_TENANT
    # Only the valid check reserved anything.
    assert client.get_budget(tenant_id="acme", task_id="t1").active_reservations == 1
    assert len(list(sync_redis.scan_iter("*:resv:*"))) == 1


def test_a_sidecar_bound_to_a_tenant_refuses_other_tenants_per_check(
    start_sidecar: Callable[..., RunningSidecar],
) -> None:
    running = start_sidecar(tenant="acme")
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as c:
        mine, theirs, unnamed = c.check_many(
            [check("s1", 10), check("s2", 10, tenant_id="globex"), check("s3", 10, tenant_id="")]
        )
    assert isinstance(mine, pb.CheckResponse)
    assert mine.decision == pb.DECISION_ALLOW
    assert isinstance(theirs, CheckRefusedError)
    assert theirs.code() == grpc.StatusCode.PERMISSION_DENIED
    assert theirs.details() == "checks[1].tenant_id: this sidecar serves tenant 'acme' only"
    assert isinstance(unnamed, pb.CheckResponse)
    assert unnamed.decision == pb.DECISION_ALLOW


def test_checks_of_several_tenants_in_one_message(start_sidecar: Callable[..., RunningSidecar]) -> None:
    running = start_sidecar()  # the default policy accepts any tenant
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as c:
        answers = c.check_many([check(f"s{i}", 100, tenant_id=f"tenant-{i % 3}") for i in range(9)])
        assert all(isinstance(a, pb.CheckResponse) and a.decision == pb.DECISION_ALLOW for a in answers)
        for n in range(3):
            assert c.get_budget(tenant_id=f"tenant-{n}", task_id="t1").active_reservations == 3


async def test_many_messages_on_one_stream_are_answered_in_order(strict: RunningSidecar) -> None:
    async with AsyncBudgetClient(strict.addr, timeout=TEST_RPC_TIMEOUT_S) as c:
        assert len(await c.check_many([check("warm", 1)])) == 1
    async with grpc.aio.insecure_channel(strict.addr) as channel:
        call = pb_grpc.BudgetServiceStub(channel).CheckStream(timeout=10)
        for n in range(20):
            message = pb.CheckStreamRequest(sequence=1000 + n)
            message.checks.add(tenant_id="acme", task_id=f"t{n}", step_id="a", estimated_input_tokens=10)
            message.checks.add(tenant_id="acme", task_id=f"t{n}", step_id="b", estimated_input_tokens=20)
            await call.write(message)
        await call.done_writing()
        responses = [response async for response in call]
    assert [r.sequence for r in responses] == [1000 + n for n in range(20)]
    assert all([x.response.granted_tokens for x in r.results] == [10, 20] for r in responses)


async def test_a_kept_open_stream_answers_overlapping_calls_each_with_its_own_checks(strict: RunningSidecar) -> None:
    async with AsyncBudgetClient(strict.addr, timeout=TEST_RPC_TIMEOUT_S) as client, client.check_stream() as stream:

        async def batch(n: int) -> list[int]:
            answers = await stream.check_many(
                [check(f"s{n}-{i}", n * 3 + i, task_id=f"t{n}") for i in range(3)]  # tokens name the check
            )
            return [a.granted_tokens for a in answers if isinstance(a, pb.CheckResponse)]

        results = await asyncio.gather(*(batch(n) for n in range(1, 21)))  # 1,950 tokens: the windows have room
        assert results == [[n * 3 + i for i in range(3)] for n in range(1, 21)]
        (refused,) = await stream.check_many([check("bad", -1)])
        assert isinstance(refused, CheckRefusedError)
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_cancelled_call_leaves_the_stream_and_the_other_calls_alone(strict: RunningSidecar) -> None:
    async with AsyncBudgetClient(strict.addr, timeout=TEST_RPC_TIMEOUT_S) as client, client.check_stream() as stream:
        abandoned = asyncio.create_task(stream.check_many([check(f"c{i}", 1, task_id="tc") for i in range(300)]))
        await asyncio.sleep(0)  # sent (or about to be), then given up on
        abandoned.cancel()
        others = await asyncio.gather(*(stream.check_many([check(f"o{n}", n + 1, task_id=f"to{n}")]) for n in range(5)))
        assert [[a.granted_tokens for a in batch if isinstance(a, pb.CheckResponse)] for batch in others] == [
            [n + 1] for n in range(5)
        ]
        with pytest.raises(asyncio.CancelledError):
            await abandoned


async def test_closing_the_channel_fails_the_waiting_calls(
    start_sidecar: Callable[..., RunningSidecar], black_hole: BlackHole
) -> None:
    running = start_sidecar(**black_hole.as_redis, check_deadline_ms=60_000)
    client = AsyncBudgetClient(running.addr, timeout=30)
    stream = client.check_stream()
    waiting = asyncio.create_task(stream.check_many([check("s1", 1)]))  # Redis never answers: it waits
    await asyncio.sleep(0.5)
    await client.close()
    with pytest.raises(grpc.RpcError):
        await asyncio.wait_for(waiting, 10)  # fails at once instead of hanging
    with pytest.raises(grpc.RpcError):
        await stream.check_many([check("s2", 1)])


async def test_a_kept_open_stream_fails_every_call_once_the_sidecar_ends_it(strict: RunningSidecar) -> None:
    async with AsyncBudgetClient(strict.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        stream = client.check_stream()
        with pytest.raises(grpc.RpcError) as caught:
            await stream.check_many([check(f"s{i}", 1) for i in range(1001)])  # too many: the sidecar ends the stream
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError):
            await stream.check_many([check("after", 1)])
        await stream.aclose()


def test_more_than_1000_checks_in_a_message_is_invalid_argument(client: BudgetClient, sync_redis: redis.Redis) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.check_many([check(f"s{i}", 1) for i in range(1001)])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "message 0: checks: holds 1001, at most 1000 are allowed"
    assert sync_redis.dbsize() == 0


def test_malformed_bytes_end_the_stream_with_invalid_argument(strict: RunningSidecar, sync_redis: redis.Redis) -> None:
    with grpc.insecure_channel(strict.addr) as channel:
        call = channel.stream_stream(CHECK_STREAM)
        good = pb.CheckStreamRequest(checks=[pb.CheckRequest(**check("s1", 1))]).SerializeToString()
        with pytest.raises(grpc.RpcError) as caught:
            list(call(iter([good, b"\xff\xff\xff"]), timeout=5))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 1: not a valid CheckStreamRequest" in caught.value.details()
    assert len(list(sync_redis.scan_iter("*:resv:*"))) == 1  # the good message before it was answered


def test_an_empty_message_gets_an_empty_answer(client: BudgetClient) -> None:
    assert client.check_many([]) == []
