"""The OpenAI Agents SDK integration (budgetwarden_client.integrations.agents): a real ``Runner.run`` of the real
``openai-agents`` against the scripted OpenAI server (chat completions, 127.0.0.1, key "test") and a real sidecar."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from agents import Agent, ModelSettings, ModelTracing, RunConfig, Runner, function_tool, set_tracing_disabled
from agents.models.openai_provider import OpenAIProvider
from openai import AsyncOpenAI

from budgetwarden_client import AdminClient, AsyncBudget, BudgetClient, BudgetDenied, CheckpointRequired, pb
from budgetwarden_client.integrations.agents import BudgetedModel, BudgetModelProvider
from scripted_openai import Reply, ScriptedOpenAI, ToolCall

from support import RunningSidecar, free_port

# A task ceiling of 10000 tokens: degraded to gpt-4o-mini with 200 output tokens past 5000, stopped at 8000. A plain
# task has 1000 tokens and neither degrades nor stops: what does not fit is denied.
AGENTS_POLICY = """
unknown_tenants: reject
tenants:
  acme:
    windows:
      day: {tokens: 1000000, usd: 100}
models:
  gpt-4o: {input_usd_per_mtok: 10, cached_input_usd_per_mtok: 2.5, output_usd_per_mtok: 30, degrade_to: gpt-4o-mini}
  gpt-4o-mini: {input_usd_per_mtok: 1, cached_input_usd_per_mtok: 0.5, output_usd_per_mtok: 4}
default_task_type: agent
task_types:
  agent:
    per_task: {tokens: 10000}
    per_step: {tokens: 4000}
    soft_threshold: 0.5
    checkpoint_threshold: 0.8
    degrade:
      - {name: cheaper, model: cheaper, max_output_tokens: 200}
  plain:
    per_task: {tokens: 1000}
  lean-one-tool:
    per_task: {tokens: 10000}
    per_step: {tokens: 4000}
    soft_threshold: 0.5
    degrade:
      - {name: lean, model: cheaper, max_output_tokens: 200, max_context_tokens: 300, max_tool_calls: 1}
  lean-no-tools:
    per_task: {tokens: 10000}
    per_step: {tokens: 4000}
    soft_threshold: 0.5
    degrade:
      - {name: lean, model: cheaper, max_output_tokens: 200, max_context_tokens: 300, max_tool_calls: 0}
"""

MAX_TOKENS = 1000


@pytest.fixture(autouse=True, scope="module")
def no_tracing() -> Iterator[None]:
    """The SDK's traces would go to OpenAI: off for these tests (and back on after)."""
    set_tracing_disabled(True)
    yield
    set_tracing_disabled(False)


@pytest.fixture
def running(start_sidecar: Callable[..., RunningSidecar], tmp_path: Path) -> RunningSidecar:
    policy = tmp_path / "policy.yaml"
    policy.write_text(AGENTS_POLICY)
    return start_sidecar(policy_file=policy, admin_listen=f"127.0.0.1:{free_port()}", check_deadline_ms=60_000)


@pytest.fixture
async def budget(running: RunningSidecar) -> AsyncIterator[AsyncBudget]:
    async with AsyncBudget(running.addr, tenant_id="acme", timeout=30) as b:
        yield b


@pytest.fixture
def client(running: RunningSidecar) -> Iterator[BudgetClient]:
    with BudgetClient(running.addr, timeout=30) as c:
        yield c


@pytest.fixture
def server() -> Iterator[ScriptedOpenAI]:
    with ScriptedOpenAI() as s:
        yield s


@pytest.fixture
async def provider(server: ScriptedOpenAI) -> AsyncIterator[OpenAIProvider]:
    """The SDK's own provider, on chat completions at the scripted server: what resolves the model names. Its client
    is closed on the test's event loop (closed after the loop, it would fail)."""
    openai_client = AsyncOpenAI(base_url=server.base_url, api_key="test")
    yield OpenAIProvider(openai_client=openai_client, use_responses=False)
    await openai_client.close()


def task_scope(client: BudgetClient, task_id: str) -> pb.ScopeState:
    state = client.get_budget(tenant_id="acme", task_id=task_id)
    return next(scope for scope in state.scopes if scope.name == "task")


def delivered(budget: AsyncBudget) -> None:
    assert budget.reporter.flush(timeout=30), "the reporter did not deliver within 30 s"


async def spend(budget: AsyncBudget, task_id: str, tokens: int) -> None:
    """The task has already spent ``tokens`` (a step outside the agent), delivered before the run."""
    async with budget.step(task_id, "earlier", model="gpt-4o", estimated_input_tokens=min(tokens, 3900)) as step:
        step.record_usage(input_tokens=tokens)
    delivered(budget)


def agent(model: str = "gpt-4o", **kwargs: object) -> Agent[None]:
    return Agent(
        name="assistant",
        instructions="You are terse.",
        model=model,
        model_settings=ModelSettings(max_tokens=MAX_TOKENS),
        **kwargs,  # type: ignore[arg-type]  # Agent's dataclass fields, passed through by name
    )


async def test_allowed_calls_report_their_usage_cached_and_reasoning_included(
    budget: AsyncBudget, client: BudgetClient, server: ScriptedOpenAI, provider: OpenAIProvider
) -> None:
    server.script("gpt-4o", Reply(text="Forty-two.", cached_tokens=4, reasoning_tokens=12))
    run_config = RunConfig(model_provider=BudgetModelProvider(budget, task_id="t1", provider=provider))

    result = await Runner.run(agent(), "What is the answer?", run_config=run_config)

    assert result.final_output == "Forty-two."
    delivered(budget)
    usage = result.context_wrapper.usage
    assert usage.requests == 1
    assert usage.output_tokens_details.reasoning_tokens == 12
    task = task_scope(client, "t1")
    # output_tokens include the reasoning tokens (as OpenAI's do): charged once, nothing left reserved.
    assert (task.used_tokens, task.reserved_tokens) == (usage.input_tokens + usage.output_tokens, 0)
    cached, fresh = 4, usage.input_tokens - 4
    assert task.used_usd_micros == fresh * 10 + cached * 2.5 + usage.output_tokens * 30  # $ per million tokens
    assert [r.model for r in server.requests] == ["gpt-4o"]
    assert server.requests[0].token_cap == MAX_TOKENS


async def test_degrade_swaps_the_model_and_caps_the_output(
    budget: AsyncBudget, client: BudgetClient, server: ScriptedOpenAI, provider: OpenAIProvider
) -> None:
    server.script("gpt-4o-mini", Reply(text="Cheaper answer."))
    await spend(budget, "t1", 5500)  # past the soft threshold (5000)
    model = BudgetedModel("gpt-4o", budget=budget, task_id="t1", provider=provider)

    result = await Runner.run(agent(model=model), "What is the answer?")  # type: ignore[arg-type]

    assert result.final_output == "Cheaper answer."
    assert [(r.model, r.token_cap) for r in server.requests] == [("gpt-4o-mini", 200)]
    delivered(budget)
    usage = result.context_wrapper.usage
    task = task_scope(client, "t1")
    assert (task.used_tokens, task.reserved_tokens) == (5500 + usage.input_tokens + usage.output_tokens, 0)
    # Charged at gpt-4o-mini's prices, the model that ran.
    assert task.used_usd_micros == 5500 * 10 + usage.input_tokens * 1 + usage.output_tokens * 4


async def test_checkpoint_stops_the_run_before_any_request(
    budget: AsyncBudget, client: BudgetClient, server: ScriptedOpenAI, provider: OpenAIProvider, running: RunningSidecar
) -> None:
    server.script("gpt-4o", Reply(text="Should not be asked."))
    server.script("gpt-4o-mini", Reply(text="Should not be asked either."))
    await spend(budget, "t1", 7900)  # the next call passes the checkpoint line (8000)
    run_config = RunConfig(model_provider=BudgetModelProvider(budget, task_id="t1", provider=provider))

    with pytest.raises(CheckpointRequired) as stopped:
        await Runner.run(agent(), "What is the answer?", run_config=run_config)

    assert stopped.value.checkpoint_id
    assert server.requests == []
    assert task_scope(client, "t1").reserved_tokens == 0
    # The id is the one the admin API approves.
    assert running.settings.admin_listen
    with AdminClient(running.settings.admin_listen, timeout=30) as admin:
        admin.approve(stopped.value.checkpoint_id, add_tokens=10000)


@function_tool
def lookup(city: str) -> str:
    """The weather in a city."""
    return f"Sunny in {city}."


async def test_a_tool_calling_run_checks_and_reports_each_llm_call(
    budget: AsyncBudget, client: BudgetClient, server: ScriptedOpenAI, provider: OpenAIProvider
) -> None:
    server.script(
        "gpt-4o",
        Reply(tool_calls=[ToolCall("lookup", {"city": "Paris"})]),
        Reply(text="It is sunny in Paris."),
    )
    run_config = RunConfig(model_provider=BudgetModelProvider(budget, task_id="t1", provider=provider))

    result = await Runner.run(agent(tools=[lookup]), "Weather in Paris?", run_config=run_config)

    assert result.final_output == "It is sunny in Paris."
    assert len(server.requests) == 2
    assert server.requests[1].messages[-1]["role"] == "tool"  # the tool ran between the two calls
    delivered(budget)
    entries = result.context_wrapper.usage.request_usage_entries
    assert len(entries) == 2
    task = task_scope(client, "t1")
    assert (task.used_tokens, task.reserved_tokens) == (sum(e.input_tokens + e.output_tokens for e in entries), 0)
    assert budget.reporter.stats.applied == 2  # one report per LLM call, each settling its own check's reservation


async def test_a_streamed_run_reports_the_usage_of_the_final_event(
    budget: AsyncBudget, client: BudgetClient, server: ScriptedOpenAI, provider: OpenAIProvider
) -> None:
    server.script("gpt-4o", Reply(text="Streamed answer.", cached_tokens=4))
    run_config = RunConfig(model_provider=BudgetModelProvider(budget, task_id="t1", provider=provider))

    result = Runner.run_streamed(agent(), "What is the answer?", run_config=run_config)
    async for _ in result.stream_events():
        pass

    assert result.final_output == "Streamed answer."
    assert server.requests[0].stream
    delivered(budget)
    usage = result.context_wrapper.usage
    assert usage.input_tokens > 0
    assert usage.output_tokens > 0
    assert usage.input_tokens_details.cached_tokens == 4
    task = task_scope(client, "t1")
    assert (task.used_tokens, task.reserved_tokens) == (usage.input_tokens + usage.output_tokens, 0)


async def test_a_stream_closed_before_its_usage_is_charged_its_reservation(
    budget: AsyncBudget, client: BudgetClient, server: ScriptedOpenAI, provider: OpenAIProvider
) -> None:
    server.script("gpt-4o", Reply(text="A long answer nobody reads to the end. " * 20))
    model = BudgetedModel("gpt-4o", budget=budget, task_id="t1", provider=provider)
    events = model.stream_response(
        "You are terse.",
        "What is the answer?",
        ModelSettings(max_tokens=100),
        [],
        None,
        [],
        ModelTracing.DISABLED,
        previous_response_id=None,
        conversation_id=None,
        prompt=None,
    )
    assert isinstance(events, AsyncGenerator)

    first = await anext(events)
    await events.aclose()  # the consumer stops before the final event (the one with the usage)

    assert first.type == "response.created"
    delivered(budget)
    task = task_scope(client, "t1")
    # The request went out: it is charged what it reserved (its prompt and the 100 output tokens), not released.
    assert task.reserved_tokens == 0
    assert task.used_tokens > 100


async def test_deny_stops_the_run_before_any_request(
    running: RunningSidecar, server: ScriptedOpenAI, provider: OpenAIProvider
) -> None:
    server.script("gpt-4o", Reply(text="Should not be asked."))
    async with AsyncBudget(running.addr, tenant_id="acme", timeout=30, task_type="plain") as plain:
        run_config = RunConfig(model_provider=BudgetModelProvider(plain, task_id="t1", provider=provider))

        with pytest.raises(BudgetDenied) as denied:  # asks for its prompt and 1000 output tokens: over the 1000
            await Runner.run(agent(), "What is the answer?", run_config=run_config)

    assert denied.value.reason == pb.REASON_TASK_BUDGET_EXHAUSTED
    assert server.requests == []


@function_tool
def forecast(city: str) -> str:
    """Tomorrow's weather in a city."""
    return f"Rain in {city}."


@function_tool
def alerts(city: str) -> str:
    """Weather alerts in a city."""
    return f"No alerts in {city}."


def history(turns: int) -> list[dict[str, str]]:
    """A long conversation (about 100 tokens a turn) for the advice's context cap to cut."""
    return [
        {"role": "user" if turn % 2 == 0 else "assistant", "content": f"turn {turn}: " + "lorem ipsum " * 50}
        for turn in range(turns)
    ] + [{"role": "user", "content": "Weather in Paris, Rome and Oslo?"}]


CALLS = [ToolCall("lookup", {"city": city}) for city in ("Paris", "Rome", "Oslo")]


async def test_degrade_trims_the_context_and_allows_one_tool_call(
    running: RunningSidecar, client: BudgetClient, server: ScriptedOpenAI, provider: OpenAIProvider
) -> None:
    server.script("gpt-4o-mini", Reply(tool_calls=CALLS), Reply(text="Sunny in Paris."))
    conversation = history(8)
    async with AsyncBudget(running.addr, tenant_id="acme", timeout=30, task_type="lean-one-tool") as lean:
        await spend(lean, "t1", 5500)  # past the soft threshold: every call is degraded
        run_config = RunConfig(model_provider=BudgetModelProvider(lean, task_id="t1", provider=provider))
        weather = agent(tools=[lookup, forecast, alerts])
        result = await Runner.run(weather, conversation, run_config=run_config)  # type: ignore[arg-type]
        delivered(lean)

    assert result.final_output == "Sunny in Paris."
    first, second = server.requests
    assert (first.model, first.token_cap, first.body["parallel_tool_calls"]) == ("gpt-4o-mini", 200, False)
    # The context cap: the instructions and the most recent turns only.
    assert first.messages[0] == {"role": "system", "content": "You are terse."}
    assert 1 <= len(first.messages) - 1 < len(conversation)
    assert first.messages[-1]["content"] == conversation[-1]["content"]
    # The model asked for three calls: the runner ran one (the only tool result the next call carries).
    (called,) = [m for m in second.messages if m.get("tool_calls")]
    assert [call["function"]["arguments"] for call in called["tool_calls"]] == ['{"city":"Paris"}']
    assert [m["content"] for m in second.messages if m["role"] == "tool"] == ["Sunny in Paris."]
    assert len(second.messages) - 1 < len(conversation) + 2
    assert result.context_wrapper.usage.requests == 2
    assert task_scope(client, "t1").reserved_tokens == 0


async def test_degrade_to_no_tool_calls_asks_for_none_and_runs_none(
    running: RunningSidecar, server: ScriptedOpenAI, provider: OpenAIProvider
) -> None:
    server.script("gpt-4o-mini", Reply(text="No tools needed.", tool_calls=CALLS))
    async with AsyncBudget(running.addr, tenant_id="acme", timeout=30, task_type="lean-no-tools") as lean:
        await spend(lean, "t1", 5500)
        run_config = RunConfig(model_provider=BudgetModelProvider(lean, task_id="t1", provider=provider))
        streamed = Runner.run_streamed(agent(tools=[lookup, forecast]), history(2), run_config=run_config)  # type: ignore[arg-type]
        async for _ in streamed.stream_events():
            pass
        delivered(lean)

    assert streamed.final_output == "No tools needed."
    (only,) = server.requests  # no tool ran, so no second call
    assert only.body["tool_choice"] == "none"
