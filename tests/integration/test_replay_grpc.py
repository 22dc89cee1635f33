"""Checking a step again, over a real socket: Check and CheckStream answer a replay with what the first check
answered, and refuse another request for a step that holds a reservation (the rules themselves, through the Limiter,
are tests/store/test_replay.py's)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import BudgetClient, CheckRefusedError

from support import RunningSidecar
from support_policies import LADDER_POLICY


@pytest.fixture
def client(start_sidecar: Callable[..., RunningSidecar], tmp_path: Any) -> Iterator[BudgetClient]:
    path = tmp_path / "policy.yaml"
    path.write_text(LADDER_POLICY)
    sidecar = start_sidecar(policy_file=path, check_deadline_ms=5000)
    with BudgetClient(sidecar.addr, timeout=30.0) as c:
        yield c


def check(step: str, tokens: int, output: int = 0, **fields: Any) -> dict[str, Any]:
    values = {"tenant_id": "acme", "task_id": "t1", "step_id": step, "model": "big", "estimated_input_tokens": tokens}
    return values | {"max_output_tokens": output} | fields


def answer(response: pb.CheckResponse) -> pb.CheckResponse:
    """The answer without what may differ in a replay: the figures now, the message, the replay flag."""
    kept = pb.CheckResponse()
    kept.CopyFrom(response)
    for name in ("scopes", "message", "replayed"):
        kept.ClearField(name)
    return kept


def test_check_replays_its_degrade_over_grpc(client: BudgetClient) -> None:
    first = client.check(**check("s1", 2000, 1000))
    assert (first.decision, first.reason) == (pb.DECISION_DEGRADE, pb.REASON_DEGRADED_TO_FIT)
    assert (first.advice.rung, first.advice.model, first.advice.max_output_tokens) == ("cheaper", "small", 300)
    again = client.check(**check("s1", 2000, 1000))
    assert again.replayed
    assert answer(again) == answer(first)
    assert again.message == "step was checked before: " + first.message


def test_check_refuses_another_request_for_the_step_over_grpc(client: BudgetClient) -> None:
    first = client.check(**check("s1", 500))
    with pytest.raises(grpc.RpcError) as refused:
        client.check(**check("s1", 90_000))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = refused.value.details() or ""
    assert details.startswith("step_id: step 's1' of task 't1' was already checked with a different request")
    assert details.endswith("use a new step_id, or Release it first")
    task = {s.name: s for s in client.get_budget(tenant_id="acme", task_id="t1").scopes}["task"]
    assert task.reserved_tokens == 500  # nothing more was granted
    assert answer(client.check(**check("s1", 500))) == answer(first)


def test_check_stream_replays_and_refuses_per_check(client: BudgetClient) -> None:
    (first,) = client.check_many([check("s1", 2000, 1000)])
    assert isinstance(first, pb.CheckResponse)
    assert first.decision == pb.DECISION_DEGRADE
    replayed, refused, fresh = client.check_many([check("s1", 2000, 1000), check("s1", 2000), check("s2", 100)])
    assert isinstance(replayed, pb.CheckResponse)
    assert replayed.replayed
    assert answer(replayed) == answer(first)
    assert isinstance(refused, CheckRefusedError)
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.details().startswith("checks[1].step_id: step 's1' of task 't1' was already checked with a ")
    assert isinstance(fresh, pb.CheckResponse)
    assert (fresh.decision, fresh.granted_tokens) == (pb.DECISION_ALLOW, 100)
    task = {s.name: s for s in fresh.scopes}["task"]
    assert task.reserved_tokens == first.granted_tokens + 100
