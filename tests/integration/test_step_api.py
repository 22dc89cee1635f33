"""The step API (``Budget``, ``AsyncBudget``) over a real sidecar: decisions, the advice applied, typed refusals,
usage reported through the background reporter, releases, the local fail mode, OpenAI-format messages."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from budgetwarden_client import (
    IMAGE_TOKENS,
    AdminClient,
    AsyncBudget,
    BackgroundReporter,
    Budget,
    BudgetClient,
    BudgetDenied,
    BudgetError,
    BudgetUnavailable,
    CheckpointRequired,
    Step,
    pb,
)

from support import BlackHole, RunningSidecar, free_port
from support_policies import AGENT_POLICY, start_with_policy

# Bounds for what must not hang: the step's deadline is 1 s, the bound is far beyond any scheduling delay.
DEADLINE = 1.0
NO_HANG_BOUND = 30.0


@pytest.fixture
def running(start_sidecar: Callable[..., RunningSidecar], tmp_path: Path) -> RunningSidecar:
    return start_with_policy(start_sidecar, tmp_path, AGENT_POLICY)


@pytest.fixture
def budget(running: RunningSidecar) -> Iterator[Budget]:
    with Budget(running.addr, tenant_id="acme", timeout=30) as b:
        yield b


@pytest.fixture
async def abudget(running: RunningSidecar) -> AsyncIterator[AsyncBudget]:
    async with AsyncBudget(running.addr, tenant_id="acme", timeout=30) as b:
        yield b


@pytest.fixture
def client(running: RunningSidecar) -> Iterator[BudgetClient]:
    with BudgetClient(running.addr, timeout=30) as c:
        yield c


@pytest.fixture
def admin(running: RunningSidecar) -> Iterator[AdminClient]:
    assert running.settings.admin_listen
    with AdminClient(running.settings.admin_listen, timeout=30) as c:
        yield c


def task_scope(client: BudgetClient, task_id: str, tenant_id: str = "acme") -> pb.ScopeState:
    budget = client.get_budget(tenant_id=tenant_id, task_id=task_id)
    return next(scope for scope in budget.scopes if scope.name == "task")


def delivered(reporter: BackgroundReporter) -> None:
    assert reporter.flush(timeout=30), "the reporter did not deliver within 30 s"


def spend(budget: Budget, task_id: str, step_id: str, tokens: int) -> None:
    """A step that ran and spent ``tokens`` (input), delivered before the next check."""
    with budget.step(task_id, step_id, model="big", estimated_input_tokens=min(tokens, 3900)) as step:
        step.record_usage(input_tokens=tokens)
    delivered(budget.reporter)


ASK_1000: dict[str, Any] = {"model": "big", "estimated_input_tokens": 1000}


def chat(turns: int) -> list[dict[str, Any]]:
    """A system message and ``turns`` user/assistant messages of about 100 tokens each."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are terse."}]
    for turn in range(turns):
        role = "user" if turn % 2 == 0 else "assistant"
        messages.append({"role": role, "content": f"turn {turn}: " + "lorem ipsum " * 50})
    return messages


def test_allow_gives_the_asked_model_the_cost_and_reports_usage_on_exit(budget: Budget, client: BudgetClient) -> None:
    with budget.step("t1", "s1", model="big", estimated_input_tokens=1000, max_output_tokens=500) as step:
        assert isinstance(step, Step)
        assert (step.decision, step.model, step.max_tokens) == (pb.DECISION_ALLOW, "big", 500)
        assert not step.from_fail_mode
        assert step.cost_usd_micros == 1000 * 10 + 500 * 30  # $10 and $30 per million tokens
        assert step.remaining_tokens == 10000 - 1500  # the task's, with this reservation held
        assert step.trim(chat(3)) == chat(3)  # no advice, nothing to trim
        step.record_usage(input_tokens=900, output_tokens=300, cached_input_tokens=100, reasoning_tokens=50)
    delivered(budget.reporter)
    task = task_scope(client, "t1")
    assert (task.used_tokens, task.reserved_tokens) == (900 + 300 + 50, 0)  # reasoning counted as output
    assert budget.reporter.stats.applied == 1


def test_degrade_swaps_the_model_caps_output_and_trims_the_context(budget: Budget, client: BudgetClient) -> None:
    spend(budget, "t1", "s1", 3900)
    messages = chat(12)  # about 1200 tokens: with 3900 held, past the soft threshold of 5000
    with budget.step("t1", "s2", model="big", messages=messages, max_output_tokens=1000) as step:
        assert (step.decision, step.response.reason) == (pb.DECISION_DEGRADE, pb.REASON_SOFT_THRESHOLD)
        assert (step.model, step.max_tokens, step.max_context_tokens) == ("small", 200, 500)
        trimmed = step.trim(messages)
        step.record_usage(input_tokens=480, output_tokens=150)
    assert trimmed[0] == messages[0]  # the system message stays
    kept = trimmed[1:]
    assert 1 <= len(kept) < len(messages) - 1
    assert kept == messages[-len(kept) :]  # the most recent ones, in order
    # The sidecar's own count of what trim() kept is within the advice.
    probe = client.check(tenant_id="acme", task_id="probe", step_id="p1", model="small", messages=trimmed)
    assert 0 < probe.token_count.input_tokens <= 500, probe.token_count
    delivered(budget.reporter)
    assert task_scope(client, "t1").used_tokens == 3900 + 480 + 150


def test_checkpoint_raises_with_an_id_the_admin_approves_then_the_step_passes(
    budget: Budget, admin: AdminClient
) -> None:
    spend(budget, "t1", "s1", 7800)  # even degraded (500 of context) the next step passes the checkpoint line, 8000
    with pytest.raises(CheckpointRequired) as caught, budget.step("t1", "s2", model="big", estimated_input_tokens=1000):
        pytest.fail("a step at the checkpoint must not run")
    stop = caught.value
    assert isinstance(stop, BudgetError)
    assert stop.checkpoint_id.startswith("ck1.")
    assert stop.reason == pb.REASON_CHECKPOINT_REQUIRED
    assert stop.message
    assert stop.remaining_tokens == 10000 - 7800

    admin.approve(stop.checkpoint_id, add_tokens=10000)
    with budget.step("t1", "s2", model="big", estimated_input_tokens=1000) as step:
        assert step.decision == pb.DECISION_ALLOW  # 8800 of 20000: under the new soft threshold
        step.record_usage(input_tokens=1000)


def test_deny_raises_with_the_reason_and_retry_after(running: RunningSidecar) -> None:
    with Budget(running.addr, tenant_id="tight", timeout=30) as budget:
        spend(budget, "t1", "s1", 900)
        with pytest.raises(BudgetDenied) as caught, budget.step("t1", "s2", model="big", estimated_input_tokens=400):
            pytest.fail("a denied step must not run")
    denied = caught.value
    assert denied.reason == pb.REASON_TENANT_WINDOW_EXHAUSTED
    assert denied.retry_after is not None
    assert 0 < denied.retry_after <= 60
    assert denied.remaining_tokens == 100
    assert denied.message


def test_deny_by_the_step_cap_has_no_retry_after(budget: Budget) -> None:
    step = budget.step("t1", "s1", model="small", prompt_text="hi", max_output_tokens=4500, task_type="plain")
    with pytest.raises(BudgetDenied) as caught, step:
        pytest.fail("a denied step must not run")
    assert caught.value.reason == pb.REASON_STEP_CAP_EXCEEDED
    assert caught.value.retry_after is None


def test_a_step_that_fails_before_any_usage_releases_its_reservation(budget: Budget, client: BudgetClient) -> None:
    def fails(step: Step) -> None:
        assert step.reservation_id
        raise RuntimeError("the model call failed")

    with pytest.raises(RuntimeError, match="the model call failed"), budget.step("t1", "s1", **ASK_1000) as step:
        fails(step)
    answer = client.get_budget(tenant_id="acme", task_id="t1")
    assert answer.active_reservations == 0
    task = task_scope(client, "t1")
    assert (task.used_tokens, task.reserved_tokens) == (0, 0)


def test_a_step_that_fails_after_usage_reports_it(budget: Budget, client: BudgetClient) -> None:
    def fails(step: Step) -> None:
        step.record_usage(input_tokens=1000, output_tokens=20)
        raise RuntimeError("the reply could not be parsed")

    with pytest.raises(RuntimeError, match="parsed"), budget.step("t1", "s1", **ASK_1000) as step:
        fails(step)
    delivered(budget.reporter)
    task = task_scope(client, "t1")
    assert (task.used_tokens, task.reserved_tokens) == (1020, 0)


def test_a_step_that_completes_without_usage_is_charged_what_it_reserved(budget: Budget, client: BudgetClient) -> None:
    with budget.step("t1", "s1", model="big", estimated_input_tokens=1000, max_output_tokens=300):
        pass
    delivered(budget.reporter)
    assert task_scope(client, "t1").used_tokens == 1300


async def test_async_twin(abudget: AsyncBudget, client: BudgetClient) -> None:
    async with abudget.step("t1", "s1", model="big", messages=chat(2), max_output_tokens=100) as step:
        assert (step.decision, step.model) == (pb.DECISION_ALLOW, "big")
        assert step.input_tokens > 100
        step.record_usage(input_tokens=step.input_tokens, output_tokens=40)
    counted = step.input_tokens
    with pytest.raises(RuntimeError):
        async with abudget.step("t1", "s2", model="big", estimated_input_tokens=500):
            raise RuntimeError("failed before spending")
    delivered(abudget.reporter)
    task = task_scope(client, "t1")
    assert (task.used_tokens, task.reserved_tokens) == (counted + 40, 0)

    async with abudget.step("t1", "s3", model="big", estimated_input_tokens=3900) as step:
        step.record_usage(input_tokens=7800)  # more than reserved: charged all the same
    delivered(abudget.reporter)
    with pytest.raises(CheckpointRequired):
        async with abudget.step("t1", "s4", model="big", estimated_input_tokens=3900):
            pytest.fail("must not run")


async def test_a_full_report_queue_never_blocks_the_event_loop(running: RunningSidecar) -> None:
    """``on_full="block"`` with the queue full: the step's exit waits for room, the event loop runs on."""
    # Nothing listens at the reporter's address: the worker retries its first record until the reporter closes, and
    # the record queued after it stays queued, so the queue (of one) stays full. block_timeout only bounds how long a
    # reporter that blocked the loop would freeze this test before it fails.
    reporter = BackgroundReporter(f"127.0.0.1:{free_port()}", queue_size=1, batch_size=1, block_timeout=120)
    filler = pb.UsageRecord(tenant_id="acme", task_id="t0", step_id="s0", input_tokens=1)
    loop = asyncio.get_running_loop()
    try:
        assert reporter.report_nowait(filler)
        deadline = loop.time() + NO_HANG_BOUND
        while reporter.stats.retried == 0:  # the worker holds the first record, retrying it
            assert loop.time() < deadline, "the reporter never tried to send"
            await asyncio.sleep(0.01)
        assert reporter.report_nowait(filler)
        assert not reporter.report_nowait(filler), "the queue should be full"

        async with AsyncBudget(running.addr, tenant_id="acme", timeout=30, reporter=reporter) as abudget:
            ran = asyncio.Event()

            async def run_step() -> None:
                async with abudget.step("t1", "s1", model="big", estimated_input_tokens=10) as step:
                    step.record_usage(input_tokens=10)
                    ran.set()  # the exit, next, finds the queue full

            exiting = loop.create_task(run_step())
            await asyncio.wait_for(ran.wait(), NO_HANG_BOUND)
            for _ in range(100):  # the loop keeps turning while the exit waits for room
                await asyncio.sleep(0)
            assert not exiting.done()
            await asyncio.to_thread(reporter.close, 0)  # a closing reporter takes no more: the waiting report ends
            await asyncio.wait_for(exiting, NO_HANG_BOUND)
    finally:
        await asyncio.to_thread(reporter.close, 0)
    assert reporter.stats.dropped == 1  # the step's record, refused by the closed reporter


def test_decorator(budget: Budget, client: BudgetClient) -> None:
    @budget.step_fn(model="big", messages_arg="messages", max_output_tokens=100)
    def answer(step: Step, messages: list[dict[str, Any]], *, suffix: str) -> str:
        step.record_usage(input_tokens=step.input_tokens, output_tokens=10)
        return f"{step.model}:{len(messages)}{suffix}"

    assert answer("t1", "s1", chat(2), suffix="!") == "big:3!"
    delivered(budget.reporter)
    assert task_scope(client, "t1").used_tokens > 10


async def test_async_decorator(abudget: AsyncBudget, client: BudgetClient) -> None:
    @abudget.step_fn(model="big", estimated_input_tokens=200)
    async def answer(step: Step, question: str) -> str:
        step.record_usage(input_tokens=200, output_tokens=5)
        return f"{step.decision}:{question}"

    assert await answer("t1", "s1", "why") == f"{pb.DECISION_ALLOW}:why"
    delivered(abudget.reporter)
    assert task_scope(client, "t1").used_tokens == 205


@pytest.mark.parametrize("where", ["nobody listens", "never answers"])
def test_fail_open_runs_the_step_marked_and_does_not_hang(where: str, black_hole: BlackHole) -> None:
    addr = f"127.0.0.1:{free_port() if where == 'nobody listens' else black_hole.port}"
    budget = Budget(addr, tenant_id="acme", timeout=DEADLINE, fail_mode="open")
    started = time.monotonic()
    with budget.step("t1", "s1", model="big", estimated_input_tokens=100, max_output_tokens=50) as step:
        assert step.from_fail_mode
        assert (step.decision, step.model, step.max_tokens, step.reservation_id) == (pb.DECISION_ALLOW, "big", 50, "")
    assert time.monotonic() - started < NO_HANG_BOUND
    budget.close(drain_timeout=0)


@pytest.mark.parametrize("where", ["nobody listens", "never answers"])
async def test_fail_closed_raises_and_does_not_hang(where: str, black_hole: BlackHole) -> None:
    addr = f"127.0.0.1:{free_port() if where == 'nobody listens' else black_hole.port}"
    with Budget(addr, tenant_id="acme", timeout=DEADLINE) as budget:  # closed is the default
        started = time.monotonic()
        with pytest.raises(BudgetUnavailable, match=addr), budget.step("t1", "s1", model="big", prompt_text="hi"):
            pytest.fail("must not run")
        assert time.monotonic() - started < NO_HANG_BOUND
    async with AsyncBudget(addr, tenant_id="acme", timeout=DEADLINE) as abudget:
        started = time.monotonic()
        with pytest.raises(BudgetUnavailable):
            async with abudget.step("t1", "s1", model="big", estimated_input_tokens=100):
                pytest.fail("must not run")
        assert time.monotonic() - started < NO_HANG_BOUND


class SdkMessage:
    """Stands for an OpenAI SDK (pydantic) message: only ``model_dump()``."""

    def __init__(self, **fields: Any) -> None:
        self._fields = fields

    def model_dump(self, exclude_none: bool = False) -> dict[str, Any]:
        return {k: v for k, v in self._fields.items() if not (exclude_none and v is None)}


OPENAI_MESSAGES: list[Any] = [
    {"role": "system", "content": "You are a weather bot."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is on this picture,"},
            {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}},
            {"type": "text", "text": "and what is the weather in Paris?"},
        ],
    },
    SdkMessage(
        role="assistant",
        content=None,
        tool_calls=[
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
        ],
    ),
    SimpleNamespace(role="tool", tool_call_id="call_1", content="sunny, 21 C"),
]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


def test_openai_format_messages_are_accepted_and_counted(budget: Budget, client: BudgetClient) -> None:
    with budget.step("t1", "s1", model="big", messages=OPENAI_MESSAGES, tools=TOOLS, max_output_tokens=100) as step:
        assert step.decision == pb.DECISION_ALLOW
        assert step.approximate  # an image and tool schemas are counted by rule
        counted = step.input_tokens
        step.record_usage(input_tokens=counted)
    # The same prompt written out as the text it is counted as.
    tools_json = '[{"function": {"name": "weather", "parameters": {"type": "object"}}, "type": "function"}]'
    written = pb.ChatPrompt(
        messages=[
            pb.ChatMessage(role="system", content="You are a weather bot."),
            pb.ChatMessage(
                role="user",
                content="What is on this picture,\n" + " image" * IMAGE_TOKENS + "\nand what is the weather in Paris?",
            ),
            pb.ChatMessage(role="assistant", content='weather({"city": "Paris"})'),
            pb.ChatMessage(role="tool", content="sunny, 21 C"),
            pb.ChatMessage(role="tools", content=tools_json),
        ]
    )
    same = client.check(tenant_id="acme", task_id="t2", step_id="s1", model="big", prompt_messages=written)
    assert counted == same.token_count.input_tokens
    assert counted > IMAGE_TOKENS


def test_the_low_level_client_takes_a_list_of_messages(client: BudgetClient) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    answer = client.check(tenant_id="acme", task_id="t1", step_id="s1", model="big", messages=messages)
    as_list = client.check(tenant_id="acme", task_id="t1", step_id="s2", model="big", prompt_messages=messages)
    assert answer.decision == pb.DECISION_ALLOW
    assert answer.token_count.input_tokens == as_list.token_count.input_tokens > 0
    (many,) = client.check_many([{"tenant_id": "acme", "task_id": "t1", "step_id": "s3", "messages": messages}])
    assert isinstance(many, pb.CheckResponse)
    assert many.token_count.input_tokens > 0


class FlakySidecar:
    """A BudgetService whose Check answers UNAVAILABLE ``failures`` times, then ALLOW: what a restarting sidecar
    looks like to the channel."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.unary_unary_rpc_method_handler(
            self._check,
            request_deserializer=pb.CheckRequest.FromString,
            response_serializer=pb.CheckResponse.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("budgetwarden.v1.BudgetService", {"Check": handler})]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _check(self, request: pb.CheckRequest, context: grpc.ServicerContext) -> pb.CheckResponse:
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "starting")
        return pb.CheckResponse(decision=pb.DECISION_ALLOW, reservation_id="r1", granted_tokens=10)


@pytest.fixture
def flaky() -> Iterator[FlakySidecar]:
    sidecar = FlakySidecar(failures=2)
    yield sidecar
    sidecar.server.stop(None)


def test_the_channel_retries_unavailable_within_the_deadline(flaky: FlakySidecar) -> None:
    reporter = BackgroundReporter(f"127.0.0.1:{flaky.port}")
    budget = Budget(f"127.0.0.1:{flaky.port}", tenant_id="acme", timeout=30, reporter=reporter)
    with budget.step("t1", "s1", model="big", estimated_input_tokens=10) as step:
        assert (step.decision, step.from_fail_mode, step.reservation_id) == (pb.DECISION_ALLOW, False, "r1")
        step.record_usage(input_tokens=10)
    budget.close()  # the channel only: the reporter is the test's
    assert flaky.calls == 3  # two UNAVAILABLE answers retried by the channel, then the answer
    reporter.close(0)  # this fake has no Report: the record is not delivered, and that is not what is tested here
