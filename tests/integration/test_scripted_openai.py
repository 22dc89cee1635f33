"""The scripted OpenAI-compatible server (examples/scripted_openai), driven by the real `openai` SDK over 127.0.0.1.

Every test runs under a guard that refuses any connection off the loopback interface: the server and the SDK talking
to it need no network and no key.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageParam
from openai.types.responses import FunctionToolParam

from scripted_openai import (
    RecordedRequest,
    Reply,
    ScriptedOpenAI,
    ToolCall,
    count_prompt_tokens,
    count_text_tokens,
)

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the budget left for this task?"}]
LONG_TEXT = " ".join(f"word{i}" for i in range(200))
WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


class OffLoopbackConnectionError(AssertionError):
    pass


def _is_loopback(address: Any) -> bool:
    if not isinstance(address, tuple):
        return True  # a Unix socket path
    host = address[0]
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that opens a connection anywhere but 127.0.0.1/::1 (sync and asyncio sockets both connect here)."""
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guarded_connect(sock: socket.socket, address: Any) -> None:
        if not _is_loopback(address):
            raise OffLoopbackConnectionError(f"connection off the loopback interface: {address!r}")
        connect(sock, address)

    def guarded_connect_ex(sock: socket.socket, address: Any) -> int:
        if not _is_loopback(address):
            raise OffLoopbackConnectionError(f"connection off the loopback interface: {address!r}")
        return connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    for variable in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def server() -> Iterator[ScriptedOpenAI]:
    with ScriptedOpenAI() as running:
        running.add_model("gpt-4o")
        running.add_model("gpt-4o-mini")
        yield running


def sync_client(server: ScriptedOpenAI) -> openai.OpenAI:
    # trust_env=False: a proxy in the environment must not route 127.0.0.1; max_retries=0: an error shows at once.
    return openai.OpenAI(
        base_url=server.base_url, api_key="test", max_retries=0, http_client=openai.DefaultHttpxClient(trust_env=False)
    )


def async_client(server: ScriptedOpenAI) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=server.base_url,
        api_key="test",
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
    )


def http_call(server: ScriptedOpenAI, method: str, path: str, content: bytes | None = None) -> tuple[int, Any]:
    """A raw request (what the SDK would never send), without any proxy from the environment."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(
        server.base_url + path, data=content, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with opener.open(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


# Chat completions


def test_a_completion_reports_the_documented_usage(server: ScriptedOpenAI) -> None:
    server.script("gpt-4o", Reply(text="About 1,200 tokens.", reasoning_tokens=7, cached_tokens=5))
    with sync_client(server) as client:
        completion = client.chat.completions.create(model="gpt-4o", messages=USER)

    assert completion.choices[0].message.content == "About 1,200 tokens."
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == count_prompt_tokens(USER)
    assert usage.completion_tokens == count_text_tokens("About 1,200 tokens.") + 7
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 5
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 7


def test_the_prompt_rule_counts_messages_parts_and_tool_calls() -> None:
    # 3 a message + role + content (text parts only) + 3 priming; a name costs 1 more; tool calls count name + args.
    assert count_prompt_tokens([{"role": "user", "content": "hello"}]) == 3 + 1 + 1 + 3
    parts = [{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    assert count_prompt_tokens([{"role": "user", "content": parts}]) == 3 + 1 + 1 + 3
    assert count_prompt_tokens([{"role": "user", "content": "hello", "name": "ann"}]) == 3 + 1 + 1 + 1 + 1 + 3
    assert count_prompt_tokens([{"role": "user", "content": "hello", "name": ""}]) == 3 + 1 + 1 + 3  # as the sidecar
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert count_prompt_tokens([{"role": "assistant", "content": None, "tool_calls": [call]}]) == 3 + 1 + 1 + 1 + 3


def test_a_stream_with_include_usage_ends_with_the_usage_chunk(server: ScriptedOpenAI) -> None:
    server.script("gpt-4o", Reply(text="Three small words.", cached_tokens=2))
    with sync_client(server) as client:
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o",
                messages=USER,
                stream=True,
                stream_options={"include_usage": True},
            )
        )

    *content_chunks, last = chunks
    assert all(chunk.usage is None for chunk in content_chunks)
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == "Three small words."
    assert content_chunks[-1].choices[0].finish_reason == "stop"
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == count_prompt_tokens(USER)
    assert last.usage.completion_tokens == count_text_tokens("Three small words.")
    assert last.usage.prompt_tokens_details is not None
    assert last.usage.prompt_tokens_details.cached_tokens == 2


def test_a_stream_without_include_usage_carries_none(server: ScriptedOpenAI) -> None:
    server.script("gpt-4o", Reply(text="No usage here."))
    with sync_client(server) as client:
        chunks = list(client.chat.completions.create(model="gpt-4o", messages=USER, stream=True))

    assert chunks
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)


async def test_the_async_client_streams_with_usage(server: ScriptedOpenAI) -> None:
    server.script("gpt-4o-mini", Reply(text="Async reply.", reasoning_tokens=3))
    async with async_client(server) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=USER,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Async reply."
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == count_text_tokens("Async reply.") + 3
    assert chunks[-1].usage.completion_tokens_details is not None
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 3


def test_a_stream_closed_early_leaves_the_client_and_server_usable(server: ScriptedOpenAI) -> None:
    server.script("gpt-4o", Reply(text=LONG_TEXT), Reply(text="Next."))
    with sync_client(server) as client:
        stream = client.chat.completions.create(
            model="gpt-4o",
            messages=USER,
            stream=True,
            stream_options={"include_usage": True},
        )
        received = [next(stream), next(stream), next(stream)]
        stream.close()
        after = client.chat.completions.create(model="gpt-4o", messages=USER)

    assert [chunk.usage for chunk in received] == [None, None, None]
    assert "".join(c.choices[0].delta.content or "" for c in received) == "word0 word1 "
    assert after.choices[0].message.content == "Next."
    assert [r.stream for r in server.requests] == [True, False]


async def test_an_async_stream_closed_early_leaves_the_client_usable(server: ScriptedOpenAI) -> None:
    server.script("gpt-4o", Reply(text=LONG_TEXT), Reply(text="Next."))
    async with async_client(server) as client:
        stream = await client.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
        first = await stream.__anext__()
        await stream.close()
        after = await client.chat.completions.create(model="gpt-4o", messages=USER)

    assert first.choices[0].delta.role == "assistant"
    assert after.choices[0].message.content == "Next."


def test_a_tool_call_round_trip(server: ScriptedOpenAI) -> None:
    server.script(
        "gpt-4o",
        Reply(tool_calls=[ToolCall("get_weather", {"city": "Oslo"})]),
        Reply(text="It is 3 °C in Oslo."),
    )
    question: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Weather in Oslo?"}]
    with sync_client(server) as client:
        first = client.chat.completions.create(model="gpt-4o", messages=question, tools=[WEATHER_TOOL])
        message = first.choices[0].message
        assert first.choices[0].finish_reason == "tool_calls"
        assert message.tool_calls is not None
        (call,) = message.tool_calls
        assert call.type == "function"
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Oslo"}
        follow_up: list[Any] = [
            *question,
            message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 3}'},
        ]
        second = client.chat.completions.create(model="gpt-4o", messages=follow_up, tools=[WEATHER_TOOL])

    assert second.choices[0].message.content == "It is 3 °C in Oslo."
    asked = server.requests[1]
    assert asked.messages[-1] == {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 3}'}
    assert asked.messages[1]["tool_calls"][0]["id"] == call.id
    assert asked.tools == [WEATHER_TOOL]
    assert second.usage is not None
    assert second.usage.prompt_tokens == count_prompt_tokens(follow_up)


def test_a_streamed_tool_call_assembles_in_the_sdk_helper(server: ScriptedOpenAI) -> None:
    server.script("gpt-4o", Reply(tool_calls=[ToolCall("get_weather", {"city": "Lima"}, id="call_fixed")]))
    with (
        sync_client(server) as client,
        client.chat.completions.stream(
            model="gpt-4o",
            messages=USER,
            tools=[WEATHER_TOOL],
            stream_options={"include_usage": True},
        ) as stream,
    ):
        for _ in stream:
            pass
        completion = stream.get_final_completion()

    (call,) = completion.choices[0].message.tool_calls or []
    assert call.id == "call_fixed"
    assert json.loads(call.function.arguments) == {"city": "Lima"}
    assert completion.usage is not None
    assert completion.usage.completion_tokens == count_text_tokens("get_weather") + count_text_tokens('{"city":"Lima"}')


def test_max_tokens_truncates_the_reply_like_the_api(server: ScriptedOpenAI) -> None:
    server.script("gpt-4o", Reply(text=LONG_TEXT))
    with sync_client(server) as client:
        completion = client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=5)

    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert count_text_tokens(completion.choices[0].message.content or "") == 5


# The request log: what a DEGRADE changed


def test_the_request_log_shows_a_swapped_model_and_a_capped_max_tokens(server: ScriptedOpenAI) -> None:
    server.script("gpt-4o", Reply(text="Full model."))
    server.script("gpt-4o-mini", Reply(text="Cheaper model."), Reply(text="Cheaper again."))
    with sync_client(server) as client:
        client.chat.completions.create(model="gpt-4o", messages=USER)
        client.chat.completions.create(model="gpt-4o-mini", messages=USER[-1:], max_tokens=64)
        client.chat.completions.create(model="gpt-4o-mini", messages=USER, max_completion_tokens=32)

    first, degraded, capped = server.requests
    assert (first.endpoint, first.model, first.token_cap) == ("chat.completions", "gpt-4o", None)
    assert (degraded.model, degraded.max_tokens, degraded.max_completion_tokens) == ("gpt-4o-mini", 64, None)
    assert (capped.max_tokens, capped.max_completion_tokens, capped.token_cap) == (None, 32, 32)
    assert degraded.messages == USER[-1:]
    server.clear_requests()
    assert server.requests == []


def test_a_responder_decides_each_reply_from_the_request(server: ScriptedOpenAI) -> None:
    def echo_cap(request: RecordedRequest) -> Reply:
        return Reply(text=f"{request.model} capped at {request.token_cap}")

    server.respond_with("gpt-4o-mini", echo_cap)
    with sync_client(server) as client:
        answers = [
            client.chat.completions.create(model="gpt-4o-mini", messages=USER, max_tokens=cap) for cap in (100, 200)
        ]

    assert [a.choices[0].message.content for a in answers] == ["gpt-4o-mini capped at 100", "gpt-4o-mini capped at 200"]


def test_a_script_that_runs_out_answers_500(server: ScriptedOpenAI) -> None:
    with sync_client(server) as client, pytest.raises(openai.InternalServerError, match="no reply left"):
        client.chat.completions.create(model="gpt-4o", messages=USER)


# Responses


def test_a_response_reports_the_documented_usage(server: ScriptedOpenAI) -> None:
    server.script("gpt-4o", Reply(text="Short answer.", reasoning_tokens=4, cached_tokens=3))
    with sync_client(server) as client:
        response = client.responses.create(model="gpt-4o", input="How much is left?", instructions="Be brief.")

    assert response.status == "completed"
    assert response.output_text == "Short answer."
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How much is left?"}]
    assert response.usage is not None
    assert response.usage.input_tokens == count_prompt_tokens(prompt)
    assert response.usage.output_tokens == count_text_tokens("Short answer.") + 4
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert response.usage.input_tokens_details.cached_tokens == 3
    assert response.usage.output_tokens_details.reasoning_tokens == 4
    (asked,) = server.requests
    assert (asked.endpoint, asked.instructions, asked.messages) == ("responses", "Be brief.", prompt[1:])


def test_a_streamed_response_emits_the_api_events_and_completes_with_usage(server: ScriptedOpenAI) -> None:
    server.script("gpt-4o", Reply(text="Streamed answer here."))
    with sync_client(server) as client:
        events = list(client.responses.create(model="gpt-4o", input="Go", stream=True))

    types = [event.type for event in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == "Streamed answer here."
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.usage is not None
    assert completed.response.usage.output_tokens == count_text_tokens("Streamed answer here.")


def test_the_sdk_stream_helper_assembles_a_response(server: ScriptedOpenAI) -> None:
    server.script("gpt-4o", Reply(text="Assembled.", tool_calls=[ToolCall("get_weather", '{"city":"Rome"}')]))
    with sync_client(server) as client, client.responses.stream(model="gpt-4o", input="Go") as stream:
        for _ in stream:
            pass
        response = stream.get_final_response()

    call, message = response.output
    assert call.type == "function_call"
    assert (call.name, call.arguments) == ("get_weather", '{"city":"Rome"}')
    assert message.type == "message"
    assert response.output_text == "Assembled."


async def test_the_async_client_streams_a_response(server: ScriptedOpenAI) -> None:
    server.script("gpt-4o", Reply(text="From async.", cached_tokens=1))
    async with async_client(server) as client:
        stream = await client.responses.create(model="gpt-4o", input="Go", stream=True)
        events = [event async for event in stream]

    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "From async."
    assert events[-1].response.usage is not None
    assert events[-1].response.usage.input_tokens_details.cached_tokens == 1


def test_a_responses_tool_call_round_trip(server: ScriptedOpenAI) -> None:
    server.script(
        "gpt-4o",
        Reply(tool_calls=[ToolCall("get_weather", {"city": "Oslo"})]),
        Reply(text="Cold."),
    )
    tool: FunctionToolParam = {
        "type": "function",
        "name": "get_weather",
        "parameters": WEATHER_TOOL["function"].get("parameters"),
        "strict": True,
    }
    with sync_client(server) as client:
        first = client.responses.create(model="gpt-4o", input="Weather?", tools=[tool])
        (call,) = first.output
        assert call.type == "function_call"
        assert json.loads(call.arguments) == {"city": "Oslo"}
        items: list[Any] = [
            {"role": "user", "content": "Weather?"},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": -2}'},
        ]
        second = client.responses.create(model="gpt-4o", input=items, tools=[tool])

    assert second.output_text == "Cold."
    assert server.requests[1].messages[-1]["call_id"] == call.call_id
    assert second.usage is not None
    assert second.usage.input_tokens == count_prompt_tokens(server.requests[1].messages)


def test_max_output_tokens_makes_an_incomplete_response(server: ScriptedOpenAI) -> None:
    server.script("gpt-4o", Reply(text=LONG_TEXT), Reply(text=LONG_TEXT))
    with sync_client(server) as client:
        response = client.responses.create(model="gpt-4o", input="Go", max_output_tokens=16)
        events = list(client.responses.create(model="gpt-4o", input="Go", max_output_tokens=16, stream=True))

    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None
    assert response.usage.output_tokens == 16
    assert events[-1].type == "response.incomplete"
    assert server.requests[0].max_output_tokens == 16


# Models and errors


def test_models_lists_the_scripted_models(server: ScriptedOpenAI) -> None:
    with sync_client(server) as client:
        assert [model.id for model in client.models.list()] == ["gpt-4o", "gpt-4o-mini"]


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_an_unknown_model_is_404_in_the_api_shape(server: ScriptedOpenAI, endpoint: str) -> None:
    with sync_client(server) as client:
        ask_unknown = (
            (lambda: client.chat.completions.create(model="gpt-nope", messages=USER))
            if endpoint == "chat"
            else (lambda: client.responses.create(model="gpt-nope", input="hi"))
        )
        with pytest.raises(openai.NotFoundError) as caught:
            ask_unknown()

    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert caught.value.body == {
        "message": "The model `gpt-nope` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert server.requests == []


@pytest.mark.parametrize(
    ("path", "content", "param"),
    [
        ("/chat/completions", b"{not json", None),
        ("/chat/completions", b"[1, 2]", None),
        ("/chat/completions", b'{"messages": []}', "model"),
        ("/chat/completions", b'{"model": "gpt-4o"}', "messages"),
        ("/chat/completions", b'{"model": "gpt-4o", "messages": ["hi"]}', "messages"),
        ("/chat/completions", b'{"model": "gpt-4o", "messages": [{"role": "user"}], "max_tokens": "5"}', "max_tokens"),
        ("/responses", b'{"model": "gpt-4o"}', "input"),
        ("/responses", b'{"model": "gpt-4o", "input": "hi", "instructions": 3}', "instructions"),
    ],
)
def test_a_malformed_body_is_400_in_the_api_shape(
    server: ScriptedOpenAI, path: str, content: bytes, param: str | None
) -> None:
    status, body = http_call(server, "POST", path, content)

    assert status == 400
    error = body["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    assert server.requests == []


def test_an_unknown_path_answers_in_the_api_shape(server: ScriptedOpenAI) -> None:
    status, body = http_call(server, "GET", "/embeddings")

    assert status == 404
    assert body["error"]["message"] == "Invalid URL (GET /v1/embeddings)"


# Lifecycle


def test_the_server_starts_and_stops_twice_in_one_process_without_network() -> None:
    ports = []
    for round_ in range(2):
        server = ScriptedOpenAI({"gpt-4o": [Reply(text=f"round {round_}")]})
        with server, sync_client(server) as client:
            ports.append(server.port)
            answer = client.chat.completions.create(model="gpt-4o", messages=USER)
            assert answer.choices[0].message.content == f"round {round_}"
        # Stopped: the port no longer answers.
        with pytest.raises(openai.APIConnectionError), sync_client_at(ports[-1]) as gone:
            gone.models.list()
    assert len(ports) == 2


def test_stop_ends_a_stream_the_client_left_open() -> None:
    # A short reply: the server has written it all long before its graceful shutdown bound (5 s) runs out.
    server = ScriptedOpenAI({"gpt-4o": [Reply(text="Left open by the client.")]}).start()
    client = sync_client(server)
    stream = client.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    next(stream)
    port = server.port

    server.stop()  # returns (or raises after its own bound) although the client never closed the stream

    # The client reads what was already sent, then the end of the stream.
    rest = list(stream)
    client.close()
    assert "".join(chunk.choices[0].delta.content or "" for chunk in rest) == "Left open by the client."
    with pytest.raises(openai.APIConnectionError), sync_client_at(port) as gone:
        gone.models.list()


def test_the_guard_refuses_a_connection_off_loopback() -> None:
    # The guard above is what makes "no network" an assertion: it must really refuse.
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with probe, pytest.raises(OffLoopbackConnectionError):
        probe.connect(("192.0.2.1", 443))  # TEST-NET-1: never routed


def sync_client_at(port: int) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key="test",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(trust_env=False),
    )
