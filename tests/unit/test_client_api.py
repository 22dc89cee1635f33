"""The client's public surface: the names it exports, typed signatures mypy checks, and the pure parts of the step
API (OpenAI-format messages as a ChatPrompt, trim) without a sidecar."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mypy import api as mypy_api

import budgetwarden_client
from budgetwarden_client import IMAGE_TOKENS, IMAGE_TOKENS_LOW, RETRY_SERVICE_CONFIG, Step, pb
from budgetwarden_client._messages import chat_prompt
from budgetwarden_client._step import StepSpec

CLIENT_DIR = Path(__file__).resolve().parents[2] / "clients" / "python"


def test_public_names_are_pinned() -> None:
    assert sorted(budgetwarden_client.__all__) == [
        "AdaptiveThrottle",
        "AdminClient",
        "AsyncBudget",
        "AsyncBudgetClient",
        "AsyncStepScope",
        "BackgroundReporter",
        "Budget",
        "BudgetClient",
        "BudgetDenied",
        "BudgetError",
        "BudgetUnavailable",
        "CheckRefusedError",
        "CheckStream",
        "CheckpointRequired",
        "ClientTls",
        "DEFAULT_ADDR",
        "DEFAULT_ADMIN_ADDR",
        "DEFAULT_DEADLINE",
        "FailMode",
        "IMAGE_TOKENS",
        "IMAGE_TOKENS_LOW",
        "Message",
        "RETRY_SERVICE_CONFIG",
        "ReporterStats",
        "Step",
        "StepScope",
        "admin_pb",
        "default_addr",
        "default_tenant",
        "pb",
    ]
    for name in budgetwarden_client.__all__:
        assert hasattr(budgetwarden_client, name), name


def test_the_channel_retries_unavailable_only() -> None:
    (method,) = json.loads(RETRY_SERVICE_CONFIG)["methodConfig"]
    assert method["name"] == [{"service": "budgetwarden.v1.BudgetService"}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


def test_mypy_catches_a_misspelt_argument(tmp_path: Path) -> None:
    snippet = tmp_path / "agent.py"
    snippet.write_text(
        textwrap.dedent(
            """
            from budgetwarden_client import AsyncBudget, Budget, BudgetClient, Step

            budget = Budget(tenant_id="acme")
            with budget.step("t1", "s1", model="big", max_output_token=100) as step:
                print(step.max_tokens)
            BudgetClient().check(tenant_id="acme", task_id="t1", stepid="s1")
            Budget(fail_mode="half-open")

            @budget.step_fn(model="big")
            def call(step: Step, question: str) -> str:
                return question

            call("t1", "s1", 42)

            async def run(abudget: AsyncBudget) -> None:
                async with abudget.step("t1", "s1", modle="big"):
                    pass
            """
        )
    )
    out, err, status = mypy_api.run(
        [
            "--strict",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--config-file",
            "",
            "--follow-imports",
            "silent",
            str(snippet),
        ]
    )
    assert status == 1, (out, err)
    assert 'Unexpected keyword argument "max_output_token"' in out, out
    assert 'Unexpected keyword argument "stepid"' in out, out
    assert 'Unexpected keyword argument "modle"' in out, out
    assert '"fail_mode"' in out, out  # not a FailMode literal
    assert 'Argument 3 to "call"' in out, out  # the decorated function keeps its typed arguments
    assert out.count("error:") == 5, out


@pytest.fixture(autouse=True)
def _client_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYPYPATH", str(CLIENT_DIR))


def test_openai_messages_become_text_messages() -> None:
    converted = chat_prompt(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_text", "text": "b"}]},
            SimpleNamespace(
                role="assistant",
                content="calling",
                tool_calls=[SimpleNamespace(function=SimpleNamespace(name="f", arguments='{"x": 1}'))],
            ),
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]},
            {"role": "user", "name": "ann", "content": "thanks"},
        ]
    )
    assert not converted.approximate  # text only: counted exactly by the sidecar
    assert [(m.role, m.content, m.name) for m in converted.prompt.messages] == [
        ("system", "be brief", ""),
        ("user", "a\nb", ""),
        ("assistant", 'calling\nf({"x": 1})', ""),
        ("tool", "42", ""),
        ("user", "thanks", "ann"),
    ]


def test_images_and_tools_are_counted_by_rule_and_marked_approximate() -> None:
    high = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    low = {"type": "image_url", "image_url": {"url": "https://example.invalid/x.png", "detail": "low"}}
    converted = chat_prompt([{"role": "user", "content": [high, low]}], tools=[{"type": "function"}])
    assert converted.approximate
    user, tools = converted.prompt.messages
    assert user.content.split("\n") == [" image" * IMAGE_TOKENS, " image" * IMAGE_TOKENS_LOW]
    assert (tools.role, tools.content) == ("tools", '[{"type": "function"}]')


@pytest.mark.parametrize(
    ("messages", "problem"),
    [([{"content": "no role"}], "messages\\[0\\] has no role"), ("just text", "list of chat messages")],
)
def test_bad_messages_say_what_is_wrong(messages: Any, problem: str) -> None:
    with pytest.raises((ValueError, TypeError), match=problem):
        chat_prompt(messages)


def test_one_input_only() -> None:
    with pytest.raises(ValueError, match="one of messages, prompt_text or estimated_input_tokens"):
        StepSpec("t", "s", prompt_text="x", estimated_input_tokens=3)


def degraded_step(max_context_tokens: int, model: str = "small") -> Step:
    advice = pb.DegradeAdvice(model=model, max_context_tokens=max_context_tokens, max_output_tokens=50)
    response = pb.CheckResponse(decision=pb.DECISION_DEGRADE, advice=advice, reservation_id="r1")
    return Step(StepSpec("t", "s", model="big", max_output_tokens=500), response, approximate=False)


def test_trim_keeps_system_messages_and_the_most_recent_that_fit() -> None:
    # Without a count from the sidecar: 4 characters per token, 4 tokens per message.
    system = {"role": "system", "content": "s" * 36}  # 4 + (6 + 36) / 4 -> 15 tokens
    turns = [{"role": "user", "content": str(i) * 76} for i in range(5)]  # 4 + (4 + 76) / 4 -> 24 tokens each
    step = degraded_step(15 + 2 * 24 + 10)
    assert (step.model, step.max_tokens) == ("small", 50)
    assert step.trim([system, *turns]) == [system, turns[3], turns[4]]
    assert step.trim([*turns[:2], system, *turns[2:]]) == [system, turns[3], turns[4]]


def test_trim_drops_a_tool_result_whose_call_was_cut() -> None:
    call = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "x" * 200}}]}
    result = {"role": "tool", "tool_call_id": "c1", "content": "r" * 20}
    last = {"role": "user", "content": "u" * 20}
    assert degraded_step(40).trim([call, result, last]) == [last]


def test_trim_without_advice_changes_nothing() -> None:
    response = pb.CheckResponse(decision=pb.DECISION_ALLOW, reservation_id="r1")
    step = Step(StepSpec("t", "s", model="big", max_output_tokens=500), response, approximate=False)
    messages = [{"role": "user", "content": "x" * 10_000}]
    assert (step.model, step.max_tokens, step.trim(messages)) == ("big", 500, messages)
