"""The OpenAI SDK integration (budgetwarden_client.integrations.openai): the real ``openai`` SDK, sync and async,
against the scripted OpenAI-compatible server, with a real sidecar keeping the budget."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from budgetwarden_client import AsyncBudget, Budget, BudgetClient, CheckpointRequired, pb
from budgetwarden_client.integrations.openai import AsyncBudgetedOpenAI, BudgetedOpenAI, BudgetedStream, budgeted
from scripted_openai import RecordedRequest, Reply, ScriptedOpenAI

from support import RunningSidecar
from support_policies import AGENT_POLICY, start_with_policy

ANSWER = " ".join(f"word{i}" for i in range(40))  # about 80 tokens: several stream chunks
BOUND = 30.0  # seconds for anything awaited: far beyond any scheduling delay


def reply(request: RecordedRequest) -> Reply:
    return Reply(text=ANSWER, reasoning_tokens=7, cached_tokens=3)


@pytest.fixture
def running(start_sidecar: Callable[..., RunningSidecar], tmp_path: Path) -> RunningSidecar:
    return start_with_policy(start_sidecar, tmp_path, AGENT_POLICY)


@pytest.fixture
def server() -> Iterator[ScriptedOpenAI]:
    with ScriptedOpenAI({}) as scripted:
        scripted.respond_with("big", reply)
        scripted.respond_with("small", reply)
        yield scripted


@pytest.fixture
def budget(running: RunningSidecar) -> Iterator[Budget]:
    with Budget(running.addr, tenant_id="acme", timeout=30) as b:
        yield b


@pytest.fixture
def client(running: RunningSidecar) -> Iterator[BudgetClient]:
    with BudgetClient(running.addr, timeout=30) as c:
        yield c


@pytest.fixture
def llm(server: ScriptedOpenAI, budget: Budget) -> Iterator[BudgetedOpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0) as sdk:
        yield budgeted(sdk, budget, task_id="t1")


@pytest.fixture
async def allm(server: ScriptedOpenAI, running: RunningSidecar) -> AsyncIterator[AsyncBudgetedOpenAI]:
    async with (
        AsyncBudget(running.addr, tenant_id="acme", timeout=30) as abudget,
        openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0) as sdk,
    ):
        yield budgeted(sdk, abudget, task_id="t1")


def task(client: BudgetClient, task_id: str = "t1") -> pb.ScopeState:
    answer = client.get_budget(tenant_id="acme", task_id=task_id)
    return next(scope for scope in answer.scopes if scope.name == "task")


def used_after_delivery(reporter: Any, client: BudgetClient) -> int:
    assert reporter.flush(timeout=BOUND), "the reporter did not deliver in time"
    state = task(client)
    assert state.reserved_tokens == 0, state
    return state.used_tokens


def chat(turns: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are terse."}]
    for turn in range(turns):
        role = "user" if turn % 2 == 0 else "assistant"
        messages.append({"role": role, "content": f"turn {turn}: " + "lorem ipsum " * 50})
    return messages


USER = [{"role": "user", "content": "How much budget is left?"}]


def spend(budget: Budget, tokens: int) -> None:
    with budget.step("t1", f"spent-{tokens}", model="big", estimated_input_tokens=min(tokens, 3900)) as step:
        step.record_usage(input_tokens=tokens)
    assert budget.reporter.flush(timeout=BOUND)


# --- non-streaming --------------------------------------------------------------------------------------------------


def test_chat_is_checked_then_reports_the_scripted_usage(
    llm: BudgetedOpenAI, server: ScriptedOpenAI, budget: Budget, client: BudgetClient
) -> None:
    completion = llm.chat.completions.create(model="big", messages=USER, max_tokens=300, budget_step_id="s1")
    assert completion.choices[0].message.content == ANSWER
    usage = completion.usage
    assert usage.completion_tokens_details.reasoning_tokens == 7  # part of completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 3
    assert (server.requests[-1].model, server.requests[-1].max_tokens) == ("big", 300)
    assert used_after_delivery(budget.reporter, client) == usage.prompt_tokens + usage.completion_tokens


async def test_async_responses_report_the_scripted_usage(
    allm: AsyncBudgetedOpenAI, server: ScriptedOpenAI, client: BudgetClient
) -> None:
    response = await allm.responses.create(
        model="big", instructions="Be brief.", input="How much is left?", max_output_tokens=300
    )
    assert response.output_text == ANSWER
    assert response.usage is not None
    assert response.usage.output_tokens_details.reasoning_tokens == 7
    assert server.requests[-1].max_output_tokens == 300
    spent = response.usage.input_tokens + response.usage.output_tokens
    assert used_after_delivery(allm.budget.reporter, client) == spent


def test_sync_responses_with_items(llm: BudgetedOpenAI, budget: Budget, client: BudgetClient) -> None:
    items: list[Any] = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ]
    response = llm.responses.create(model="big", input=items)
    assert response.usage is not None
    assert used_after_delivery(budget.reporter, client) == response.usage.total_tokens


async def test_async_chat(allm: AsyncBudgetedOpenAI, client: BudgetClient) -> None:
    completion = await allm.chat.completions.create(model="big", messages=USER, max_completion_tokens=300)
    assert completion.usage is not None
    assert used_after_delivery(allm.budget.reporter, client) == completion.usage.total_tokens


# --- streaming ------------------------------------------------------------------------------------------------------


def test_a_chat_stream_is_made_to_send_usage_and_reports_it(
    llm: BudgetedOpenAI, server: ScriptedOpenAI, budget: Budget, client: BudgetClient
) -> None:
    stream = llm.chat.completions.create(model="big", messages=USER, max_tokens=300, stream=True)
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == ANSWER
    usage = chunks[-1].usage
    assert usage is not None
    assert server.requests[-1].body["stream_options"] == {"include_usage": True}  # forced: the caller did not ask
    assert used_after_delivery(budget.reporter, client) == usage.prompt_tokens + usage.completion_tokens


async def test_an_async_responses_stream_reports_the_completed_usage(
    allm: AsyncBudgetedOpenAI, client: BudgetClient
) -> None:
    stream = await allm.responses.create(model="big", input="How much is left?", max_output_tokens=300, stream=True)
    usage = None
    async for event in stream:
        if event.type == "response.completed":
            usage = event.response.usage
    assert usage is not None
    assert used_after_delivery(allm.budget.reporter, client) == usage.total_tokens


def test_a_chat_stream_left_early_is_charged_its_reservation(
    llm: BudgetedOpenAI, budget: Budget, client: BudgetClient
) -> None:
    stream = llm.chat.completions.create(model="big", messages=USER, max_tokens=300, stream=True)
    for _chunk in stream:
        break  # the loop's iterator is finalized here, and with it the step
    assert stream.step.granted_tokens > 300
    assert used_after_delivery(budget.reporter, client) == stream.step.granted_tokens


def test_a_responses_stream_closed_early_is_charged_its_reservation(
    llm: BudgetedOpenAI, budget: Budget, client: BudgetClient
) -> None:
    with llm.responses.create(model="big", input="How much is left?", max_output_tokens=300, stream=True) as stream:
        next(stream)
    assert used_after_delivery(budget.reporter, client) == stream.step.granted_tokens


async def test_an_async_chat_stream_closed_early_is_charged_its_reservation(
    allm: AsyncBudgetedOpenAI, client: BudgetClient
) -> None:
    stream = await allm.chat.completions.create(model="big", messages=USER, max_tokens=300, stream=True)
    await anext(stream)
    await stream.close()
    assert used_after_delivery(allm.budget.reporter, client) == stream.step.granted_tokens


async def test_an_async_stream_left_early_is_charged_once_asyncio_finalizes_it(
    allm: AsyncBudgetedOpenAI, client: BudgetClient
) -> None:
    stream = await allm.chat.completions.create(model="big", messages=USER, max_tokens=300, stream=True)
    async for _chunk in stream:
        break
    granted = stream.step.granted_tokens
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND
    while task(client).used_tokens != granted:  # aclose() runs in a task asyncio schedules after the break
        assert allm.budget.reporter.flush(timeout=BOUND)
        assert loop.time() < deadline, task(client)
        await asyncio.sleep(0.05)
    assert task(client).reserved_tokens == 0


# --- the decisions --------------------------------------------------------------------------------------------------


def test_degrade_swaps_the_model_caps_output_and_trims_messages(
    llm: BudgetedOpenAI, server: ScriptedOpenAI, budget: Budget, client: BudgetClient
) -> None:
    spend(budget, 3900)
    messages = chat(12)  # about 1200 tokens: past the soft threshold
    completion = llm.chat.completions.create(model="big", messages=messages, max_tokens=1000)
    sent = server.requests[-1]
    assert (sent.model, sent.max_tokens) == ("small", 200)
    assert sent.messages[0] == messages[0]  # the system message stays
    assert 1 <= len(sent.messages) - 1 < len(messages) - 1
    assert sent.messages[1:] == messages[-(len(sent.messages) - 1) :]  # the most recent ones
    assert completion.usage is not None
    assert used_after_delivery(budget.reporter, client) == 3900 + completion.usage.total_tokens


def test_degrade_trims_responses_input_items(llm: BudgetedOpenAI, server: ScriptedOpenAI, budget: Budget) -> None:
    spend(budget, 3900)
    items = chat(12)[1:]
    llm.responses.create(model="big", instructions="You are terse.", input=items, max_output_tokens=1000)
    sent = server.requests[-1]
    assert (sent.model, sent.max_output_tokens, sent.instructions) == ("small", 200, "You are terse.")
    assert 1 <= len(sent.body["input"]) < len(items)
    assert sent.body["input"] == items[-len(sent.body["input"]) :]


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_checkpoint_raises_before_any_request(
    endpoint: str, llm: BudgetedOpenAI, server: ScriptedOpenAI, budget: Budget
) -> None:
    spend(budget, 7800)
    call: Callable[[], object] = (
        (lambda: llm.chat.completions.create(model="big", messages=USER, max_tokens=1000))
        if endpoint == "chat"
        else (lambda: llm.responses.create(model="big", input="hi", max_output_tokens=1000))
    )
    with pytest.raises(CheckpointRequired) as caught:
        call()
    assert caught.value.checkpoint_id
    assert server.requests == []


async def test_async_checkpoint_raises_before_any_request(
    allm: AsyncBudgetedOpenAI, server: ScriptedOpenAI, budget: Budget
) -> None:
    spend(budget, 7800)
    with pytest.raises(CheckpointRequired):
        await allm.chat.completions.create(model="big", messages=USER, max_tokens=1000)
    assert server.requests == []


def test_an_http_error_releases_the_reservation(llm: BudgetedOpenAI, client: BudgetClient) -> None:
    with pytest.raises(openai.NotFoundError):
        llm.chat.completions.create(model="unscripted", messages=USER, max_tokens=100)
    answer = client.get_budget(tenant_id="acme", task_id="t1")
    assert answer.active_reservations == 0
    state = task(client)
    assert (state.used_tokens, state.reserved_tokens) == (0, 0)


async def test_an_async_http_error_releases_the_reservation(allm: AsyncBudgetedOpenAI, client: BudgetClient) -> None:
    with pytest.raises(openai.NotFoundError):
        await allm.responses.create(model="unscripted", input="hi", stream=True)
    assert client.get_budget(tenant_id="acme", task_id="t1").active_reservations == 0


def test_budgeted_refuses_a_mismatched_pair(server: ScriptedOpenAI, budget: Budget) -> None:
    sdk = openai.AsyncOpenAI(base_url=server.base_url, api_key="test")
    with pytest.raises(TypeError, match="AsyncBudget"):
        budgeted(sdk, budget, task_id="t1")  # type: ignore[call-overload]


def test_everything_else_is_the_clients_own(llm: BudgetedOpenAI) -> None:
    assert llm.models.list().data  # unbudgeted, passed through
    assert callable(llm.chat.completions.parse)
    assert callable(llm.responses.retrieve)


class BrokenStream:
    """Stands for an SDK stream whose connection drops after ``chunks`` chunks."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.closed = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for _ in range(self.chunks):
            yield {"choices": [], "usage": None}
        raise RuntimeError("connection lost")

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("chunks", [0, 1])
def test_a_stream_that_fails_is_charged_its_reservation_once_it_sent_anything(
    chunks: int, budget: Budget, client: BudgetClient
) -> None:
    scope = budget.step("t1", "s1", model="big", messages=USER, max_output_tokens=300)
    broken = BrokenStream(chunks)
    stream = BudgetedStream(broken, scope.__enter__(), scope)
    with pytest.raises(RuntimeError, match="connection lost"):
        list(stream)
    assert broken.closed
    assert used_after_delivery(budget.reporter, client) == (stream.step.granted_tokens if chunks else 0)
    assert client.get_budget(tenant_id="acme", task_id="t1").active_reservations == 0


# --- the SDK's other generating calls: parse, stream, with_raw_response, with_streaming_response --------------------

# Each makes one call the way its SDK helper is used and returns the usage the call reported (tokens in + out).


def _total(usage: Any) -> int:
    assert usage is not None
    return int(usage.total_tokens)


def chat_parse(llm: BudgetedOpenAI) -> int:
    return _total(llm.chat.completions.parse(model="big", messages=USER, max_tokens=300).usage)


def responses_parse(llm: BudgetedOpenAI) -> int:
    return _total(llm.responses.parse(model="big", input="How much is left?", max_output_tokens=300).usage)


def chat_stream(llm: BudgetedOpenAI) -> int:
    with llm.chat.completions.stream(model="big", messages=USER, max_tokens=300) as stream:
        return _total(stream.get_final_completion().usage)


def responses_stream(llm: BudgetedOpenAI) -> int:
    with llm.responses.stream(model="big", input="How much is left?", max_output_tokens=300) as stream:
        return _total(stream.get_final_response().usage)


def chat_raw(llm: BudgetedOpenAI) -> int:
    raw = llm.chat.completions.with_raw_response.create(model="big", messages=USER, max_tokens=300)
    assert raw.headers["content-type"].startswith("application/json")
    return _total(raw.parse().usage)


def responses_raw_parse(llm: BudgetedOpenAI) -> int:
    raw = llm.responses.with_raw_response.parse(model="big", input="How much is left?", max_output_tokens=300)
    return _total(raw.parse().usage)


def chat_raw_stream(llm: BudgetedOpenAI) -> int:
    raw = llm.chat.completions.with_raw_response.create(model="big", messages=USER, max_tokens=300, stream=True)
    chunks = list(raw.parse())
    return _total(chunks[-1].usage)


def chat_streaming_response(llm: BudgetedOpenAI) -> int:
    with llm.chat.completions.with_streaming_response.create(model="big", messages=USER, max_tokens=300) as response:
        return _total(response.parse().usage)


def responses_streaming_response_stream(llm: BudgetedOpenAI) -> int:
    with llm.responses.with_streaming_response.create(
        model="big", input="How much is left?", max_output_tokens=300, stream=True
    ) as response:
        events = list(response.parse())
    return _total(events[-1].response.usage)


HELPERS = [
    chat_parse,
    responses_parse,
    chat_stream,
    responses_stream,
    chat_raw,
    responses_raw_parse,
    chat_raw_stream,
    chat_streaming_response,
    responses_streaming_response_stream,
]


@pytest.mark.parametrize("call", HELPERS, ids=lambda call: call.__name__)
def test_every_generating_helper_is_checked_before_and_reported_after(
    call: Callable[[BudgetedOpenAI], int], llm: BudgetedOpenAI, server: ScriptedOpenAI, budget: Budget
) -> None:
    spend(budget, 7800)
    with pytest.raises(CheckpointRequired):
        call(llm)
    assert server.requests == []  # refused before any request

    with BudgetClient(budget.client.addr, timeout=30) as fresh:
        fresh_budget_used = task(fresh).used_tokens
        spent = call(llm.__class__(llm.client, budget, task_id="t2"))
        assert budget.reporter.flush(timeout=BOUND)
        state = task(fresh, "t2")
        assert (state.used_tokens, state.reserved_tokens) == (spent, 0)
        assert task(fresh).used_tokens == fresh_budget_used


def test_degrade_applies_to_the_stream_helper(llm: BudgetedOpenAI, server: ScriptedOpenAI, budget: Budget) -> None:
    spend(budget, 3900)
    with llm.chat.completions.stream(model="big", messages=chat(12), max_tokens=1000) as stream:
        completion = stream.get_final_completion()
    sent = server.requests[-1]
    assert (sent.model, sent.max_tokens) == ("small", 200)
    assert sent.body["stream_options"] == {"include_usage": True}
    assert completion.usage is not None


def test_a_stream_helper_left_early_is_charged_its_reservation(
    llm: BudgetedOpenAI, budget: Budget, client: BudgetClient
) -> None:
    with llm.responses.stream(model="big", input="How much is left?", max_output_tokens=300) as stream:
        next(iter(stream))
    granted = task(client).reserved_tokens
    assert granted > 300
    assert used_after_delivery(budget.reporter, client) == granted


def test_a_streaming_response_left_unread_reports_its_usage(
    llm: BudgetedOpenAI, server: ScriptedOpenAI, budget: Budget, client: BudgetClient
) -> None:
    with llm.chat.completions.with_streaming_response.create(model="big", messages=USER, max_tokens=300):
        pass
    reference = llm.chat.completions.create(model="big", messages=USER, max_tokens=300)  # the same call, parsed
    assert used_after_delivery(budget.reporter, client) == 2 * _total(reference.usage)


async def test_async_helpers_are_checked_and_reported(
    allm: AsyncBudgetedOpenAI, server: ScriptedOpenAI, client: BudgetClient
) -> None:
    parsed = await allm.chat.completions.parse(model="big", messages=USER, max_tokens=300)
    async with allm.responses.stream(model="big", input="hi", max_output_tokens=300) as stream:
        streamed = await stream.get_final_response()
    raw = await allm.responses.with_raw_response.create(model="big", input="hi", max_output_tokens=300)
    async with allm.chat.completions.with_streaming_response.create(
        model="big", messages=USER, max_tokens=300, stream=True
    ) as response:
        chunks = [chunk async for chunk in await response.parse()]
    spent = [parsed.usage, streamed.usage, raw.parse().usage, chunks[-1].usage]
    assert used_after_delivery(allm.budget.reporter, client) == sum(_total(usage) for usage in spent)
    assert len(server.requests) == 4


async def test_async_helpers_raise_checkpoint_before_any_request(
    allm: AsyncBudgetedOpenAI, server: ScriptedOpenAI, budget: Budget
) -> None:
    spend(budget, 7800)
    with pytest.raises(CheckpointRequired):
        await allm.chat.completions.parse(model="big", messages=USER, max_tokens=300)
    with pytest.raises(CheckpointRequired):
        async with allm.chat.completions.stream(model="big", messages=USER, max_tokens=300):
            pass
    with pytest.raises(CheckpointRequired):
        await allm.responses.with_raw_response.create(model="big", input="hi", max_output_tokens=300)
    with pytest.raises(CheckpointRequired):
        async with allm.responses.with_streaming_response.create(model="big", input="hi", max_output_tokens=300):
            pass
    assert server.requests == []


def test_messages_given_as_an_iterator_are_counted_and_sent(
    llm: BudgetedOpenAI, server: ScriptedOpenAI, budget: Budget, client: BudgetClient
) -> None:
    completion = llm.chat.completions.create(model="big", messages=iter(USER), max_tokens=300)
    assert server.requests[-1].messages == USER  # read once for the check, and the same list sent
    assert completion.usage is not None
    assert used_after_delivery(budget.reporter, client) == completion.usage.total_tokens
