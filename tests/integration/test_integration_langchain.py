"""BudgetMiddleware (budgetwarden_client.integrations.langchain) end to end: a real LangChain v1 agent
(``create_agent`` over ``ChatOpenAI``) calling the scripted OpenAI server on 127.0.0.1, checked by a real sidecar.
The server's request log shows what the model was really asked; ``get_budget`` shows what was reported."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from budgetwarden_client import AdminClient, AsyncBudget, Budget, BudgetClient, BudgetDenied, pb
from budgetwarden_client.integrations.langchain import CHECKPOINT_INTERRUPT, BudgetMiddleware
from scripted_openai import Reply, ScriptedOpenAI, ToolCall

from support import RunningSidecar
from support_policies import AGENT_POLICY, start_with_policy


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


@pytest.fixture
def running(start_sidecar: Callable[..., RunningSidecar], tmp_path: Path) -> RunningSidecar:
    return start_with_policy(start_sidecar, tmp_path, AGENT_POLICY)


@pytest.fixture
def server() -> Iterator[ScriptedOpenAI]:
    with ScriptedOpenAI() as running:
        running.add_model("big")
        running.add_model("small")
        yield running


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


def chat_model(server: ScriptedOpenAI) -> ChatOpenAI:
    return ChatOpenAI(model="big", base_url=server.base_url, api_key="test", max_tokens=500, max_retries=0)


def thread(task_id: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": task_id}}


def task_scope(client: BudgetClient, task_id: str, tenant_id: str = "acme") -> pb.ScopeState:
    state = client.get_budget(tenant_id=tenant_id, task_id=task_id)
    return next(scope for scope in state.scopes if scope.name == "task")


def delivered(budget: Budget | AsyncBudget) -> None:
    assert budget.reporter.flush(timeout=30), "the reporter did not deliver within 30 s"


def spend(budget: Budget, task_id: str, tokens: int) -> None:
    """The task has already spent ``tokens`` (a step outside the agent), delivered before the agent runs."""
    with budget.step(task_id, "earlier", model="big", estimated_input_tokens=min(tokens, 3900)) as step:
        step.record_usage(input_tokens=tokens)
    delivered(budget)


def spent(messages: list[Any]) -> int:
    """What the agent's model calls cost, by their usage_metadata (reasoning is inside output_tokens)."""
    return sum(
        m.usage_metadata["input_tokens"] + m.usage_metadata["output_tokens"]
        for m in messages
        if isinstance(m, AIMessage) and m.usage_metadata
    )


def long_chat(turns: int) -> list[HumanMessage | AIMessage]:
    """``turns`` user/assistant messages of about 100 tokens each, ending with a user turn."""
    messages: list[HumanMessage | AIMessage] = []
    for turn in range(turns):
        text = f"turn {turn}: " + "lorem ipsum " * 50
        messages.append(HumanMessage(text) if turn % 2 == 0 else AIMessage(text))
    return messages


def test_allow_runs_each_model_call_as_asked_and_reports_its_usage(
    budget: Budget, server: ScriptedOpenAI, client: BudgetClient
) -> None:
    server.script(
        "big",
        Reply(tool_calls=[ToolCall("get_weather", {"city": "Paris"})], cached_tokens=10),
        Reply(text="It is sunny in Paris.", reasoning_tokens=7),
    )
    agent = create_agent(chat_model(server), [get_weather], middleware=[BudgetMiddleware(budget)])
    result = agent.invoke({"messages": [HumanMessage("Weather in Paris?")]}, thread("t-allow"))

    assert result["messages"][-1].content == "It is sunny in Paris."
    assert [(r.model, r.token_cap) for r in server.requests] == [("big", 500), ("big", 500)]
    final = result["messages"][-1].usage_metadata
    assert final["output_token_details"]["reasoning"] == 7
    assert result["messages"][1].usage_metadata["input_token_details"]["cache_read"] == 10
    delivered(budget)
    task = task_scope(client, "t-allow")
    # Both calls (steps model-1, model-2) charged what the model reported, reasoning once, nothing left reserved.
    assert (task.used_tokens, task.reserved_tokens) == (spent(result["messages"]), 0)
    assert budget.reporter.stats.applied == 2


def test_degrade_swaps_the_model_caps_the_output_and_trims_the_context(
    budget: Budget, server: ScriptedOpenAI, client: BudgetClient
) -> None:
    spend(budget, "t-degrade", 3900)
    server.script("small", Reply(text="Short answer."))
    agent = create_agent(chat_model(server), [], system_prompt="Be terse.", middleware=[BudgetMiddleware(budget)])
    history = long_chat(13)  # about 1300 tokens: with 3900 spent, past the soft threshold of 5000
    result = agent.invoke({"messages": history}, thread("t-degrade"))

    assert result["messages"][-1].content == "Short answer."
    (request,) = server.requests
    assert (request.model, request.token_cap) == ("small", 200)
    # The context was cut to the advised 500 tokens: the system message and the most recent turns only.
    assert request.messages[0] == {"role": "system", "content": "Be terse."}
    assert 1 < len(request.messages) < len(history) + 1
    assert request.messages[-1]["content"] == history[-1].content
    assert len(result["messages"]) == len(history) + 1  # the graph state keeps the whole conversation
    delivered(budget)
    assert task_scope(client, "t-degrade").used_tokens == 3900 + spent(result["messages"][-1:])


def test_degrade_uses_the_model_given_for_the_advised_name_and_a_fixed_task_id(
    budget: Budget, server: ScriptedOpenAI, client: BudgetClient
) -> None:
    spend(budget, "fixed-task", 3900)
    server.script("small", Reply(text="Short answer."))
    small = ChatOpenAI(model="small", base_url=server.base_url, api_key="test", temperature=0.25, max_retries=0)
    middleware = BudgetMiddleware(budget, task_id="fixed-task", models={"small": small})
    agent = create_agent(chat_model(server), [], middleware=[middleware])
    result = agent.invoke({"messages": long_chat(13)}, thread("some-thread"))

    (request,) = server.requests
    assert (request.model, request.token_cap, request.body.get("temperature")) == ("small", 200, 0.25)
    delivered(budget)
    assert task_scope(client, "fixed-task").used_tokens == 3900 + spent(result["messages"][-1:])


def test_deny_refuses_the_call_before_it_reaches_the_model(running: RunningSidecar, server: ScriptedOpenAI) -> None:
    with Budget(running.addr, tenant_id="tight", timeout=30) as budget:
        spend(budget, "t-deny", 900)
        agent = create_agent(chat_model(server), [], middleware=[BudgetMiddleware(budget)])
        with pytest.raises(BudgetDenied) as caught:
            agent.invoke({"messages": [HumanMessage("Hello?")]}, thread("t-deny"))
    assert caught.value.reason == pb.REASON_TENANT_WINDOW_EXHAUSTED
    assert caught.value.retry_after is not None
    assert server.requests == []


def test_checkpoint_interrupts_the_graph_which_resumes_after_approval(
    budget: Budget, server: ScriptedOpenAI, client: BudgetClient, admin: AdminClient
) -> None:
    spend(budget, "t-checkpoint", 7800)  # this call's reservation passes the checkpoint line, 8000
    server.script("big", Reply(text="Done."))
    agent = create_agent(chat_model(server), [], middleware=[BudgetMiddleware(budget)], checkpointer=InMemorySaver())
    paused = agent.invoke({"messages": [HumanMessage("Go on.")]}, thread("t-checkpoint"))

    (stop,) = paused["__interrupt__"]
    assert stop.value["type"] == CHECKPOINT_INTERRUPT
    assert stop.value["checkpoint_id"].startswith("ck1.")
    assert (stop.value["task_id"], stop.value["step_id"]) == ("t-checkpoint", "model-1")
    assert stop.value["remaining_tokens"] == 10000 - 7800
    assert server.requests == []  # nothing reached the model
    assert agent.get_state(thread("t-checkpoint")).next == ("model",)  # paused at the model node

    admin.approve(stop.value["checkpoint_id"], add_tokens=10000)
    resumed = agent.invoke(Command(resume="approved"), thread("t-checkpoint"))

    assert "__interrupt__" not in resumed
    assert resumed["messages"][-1].content == "Done."
    assert [r.model for r in server.requests] == ["big"]
    delivered(budget)
    assert task_scope(client, "t-checkpoint").used_tokens == 7800 + spent(resumed["messages"])


def test_resuming_before_approval_interrupts_again(budget: Budget, server: ScriptedOpenAI) -> None:
    spend(budget, "t-again", 7800)
    agent = create_agent(chat_model(server), [], middleware=[BudgetMiddleware(budget)], checkpointer=InMemorySaver())
    first = agent.invoke({"messages": [HumanMessage("Go on.")]}, thread("t-again"))
    again = agent.invoke(Command(resume="not yet"), thread("t-again"))
    (stop,) = again["__interrupt__"]
    assert stop.value["type"] == CHECKPOINT_INTERRUPT
    assert stop.value["step_id"] == first["__interrupt__"][0].value["step_id"]
    assert server.requests == []


async def test_async_agent_checks_swaps_and_reports(
    abudget: AsyncBudget, server: ScriptedOpenAI, client: BudgetClient, running: RunningSidecar
) -> None:
    with Budget(running.addr, tenant_id="acme", timeout=30) as budget:
        spend(budget, "t-async", 3900)
    server.script("small", Reply(text="Short answer."))
    agent = create_agent(chat_model(server), [], middleware=[BudgetMiddleware(abudget)])
    result = await agent.ainvoke({"messages": long_chat(13)}, thread("t-async"))

    assert result["messages"][-1].content == "Short answer."
    assert [(r.model, r.token_cap) for r in server.requests] == [("small", 200)]
    delivered(abudget)
    assert task_scope(client, "t-async").used_tokens == 3900 + spent(result["messages"][-1:])


def test_a_sync_agent_needs_a_blocking_budget(abudget: AsyncBudget, server: ScriptedOpenAI) -> None:
    agent = create_agent(chat_model(server), [], middleware=[BudgetMiddleware(abudget)])
    with pytest.raises(TypeError, match="need a Budget"):
        agent.invoke({"messages": [HumanMessage("Hello?")]}, thread("t-mismatch"))
    assert server.requests == []


def test_without_a_checkpointer_the_run_still_stops_before_the_model(budget: Budget, server: ScriptedOpenAI) -> None:
    spend(budget, "t-no-saver", 7800)
    agent = create_agent(chat_model(server), [], middleware=[BudgetMiddleware(budget)])
    stopped = agent.invoke({"messages": [HumanMessage("Go on.")]}, thread("t-no-saver"))
    (stop,) = stopped["__interrupt__"]
    assert stop.value["checkpoint_id"].startswith("ck1.")
    assert server.requests == []


def test_a_streamed_run_reports_the_usage_of_the_final_chunk(
    budget: Budget, server: ScriptedOpenAI, client: BudgetClient
) -> None:
    server.script("big", Reply(text="Streamed answer, token by token."))
    agent = create_agent(chat_model(server), [], middleware=[BudgetMiddleware(budget)])
    chunks = [
        chunk
        for chunk, _ in agent.stream({"messages": [HumanMessage("Hi")]}, thread("t-stream"), stream_mode="messages")
    ]
    assert len(chunks) > 1
    (request,) = server.requests
    assert request.stream  # the model really streamed, and was asked for a final usage chunk
    assert request.body.get("stream_options") == {"include_usage": True}
    usage = sum(
        c.usage_metadata["input_tokens"] + c.usage_metadata["output_tokens"] for c in chunks if c.usage_metadata
    )
    assert usage > 0
    delivered(budget)
    assert task_scope(client, "t-stream").used_tokens == usage
