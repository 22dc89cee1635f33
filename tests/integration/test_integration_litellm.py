"""The LiteLLM integration (budgetwarden_client.integrations.litellm) driven end to end: ``litellm.acompletion`` against
the scripted OpenAI server, checked and reported by ``BudgetwardenLogger`` against a real sidecar.

LiteLLM runs offline here: ``LITELLM_LOCAL_MODEL_COST_MAP`` and ``LITELLM_OFFLINE_MODE`` are set before it is imported
(it would fetch its cost map otherwise), every test refuses connections off the loopback interface, and
``test_litellm_makes_no_network_call`` imports it and makes a call in a fresh interpreter that refuses any lookup or
connection off the loopback from the start.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

import litellm  # after the environment above, which keeps it offline
import pytest

from budgetwarden_client import AdminClient, AsyncBudget, BudgetDenied, CheckpointRequired, pb
from budgetwarden_client.integrations.litellm import BudgetwardenLogger
from scripted_openai import Reply, ScriptedOpenAI, count_prompt_tokens

from support import RunningSidecar, free_port

POLICY = """
unknown_tenants: reject
tenants:
  acme:
    windows:
      day: {tokens: 1000000, usd: 100}
models:
  big: {input_usd_per_mtok: 10, cached_input_usd_per_mtok: 2.5, output_usd_per_mtok: 30, degrade_to: small}
  small: {input_usd_per_mtok: 1, cached_input_usd_per_mtok: 0.5, output_usd_per_mtok: 4}
default_task_type: agent
task_types:
  agent:
    per_task: {tokens: 10000}
    per_step: {tokens: 4000}
    soft_threshold: 0.5
    checkpoint_threshold: 0.8
    degrade:
      - {name: cheaper, model: small, max_output_tokens: 200, max_context_tokens: 500}
  plain:
    per_task: {tokens: 1000000}
    per_step: {tokens: 4000}
"""

HELLO: list[dict[str, Any]] = [{"role": "user", "content": "Say hello to the budget."}]
BOUND = 30.0  # seconds to wait for what happens in the background (usage delivered); far beyond any delay


def _is_loopback(address: Any) -> bool:
    if not isinstance(address, tuple):
        return True  # a Unix socket path
    host = address[0]
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any connection anywhere but the loopback (the SDK, the scripted server and the sidecar all live there)."""
    connect = socket.socket.connect

    def guarded_connect(sock: socket.socket, address: Any) -> None:
        if not _is_loopback(address):
            raise AssertionError(f"connection off the loopback interface: {address!r}")
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    # LiteLLM's own lists of the loggers it calls back, filled from litellm.callbacks on each call: fresh per test.
    for name in ("callbacks", "input_callback", "success_callback", "failure_callback"):
        monkeypatch.setattr(litellm, name, [])
    for name in ("_async_success_callback", "_async_failure_callback"):
        monkeypatch.setattr(litellm, name, [])
    for variable in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def running(start_sidecar: Callable[..., RunningSidecar], tmp_path: Path) -> RunningSidecar:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    return start_sidecar(policy_file=policy, admin_listen=f"127.0.0.1:{free_port()}", check_deadline_ms=60_000)


@pytest.fixture
def server() -> Iterator[ScriptedOpenAI]:
    with ScriptedOpenAI() as scripted:
        yield scripted


@pytest.fixture
async def budget(running: RunningSidecar) -> AsyncIterator[AsyncBudget]:
    async with AsyncBudget(running.addr, tenant_id="acme", timeout=30) as b:
        yield b


@pytest.fixture
def installed(budget: AsyncBudget, monkeypatch: pytest.MonkeyPatch) -> BudgetwardenLogger:
    """The logger as an application installs it: ``litellm.callbacks = [BudgetwardenLogger(...)]``."""
    handler = BudgetwardenLogger(budget)
    monkeypatch.setattr(litellm, "callbacks", [handler])
    return handler


async def call(server: ScriptedOpenAI, model: str, task_id: str, step_id: str, **kwargs: Any) -> Any:
    return await litellm.acompletion(
        model=f"openai/{model}",
        api_base=server.base_url,
        api_key="test",
        messages=kwargs.pop("messages", HELLO),
        metadata={"budgetwarden_task_id": task_id, "budgetwarden_step_id": step_id},
        **kwargs,
    )


async def task_scope(budget: AsyncBudget, task_id: str) -> pb.ScopeState:
    state = await budget.client.get_budget(tenant_id="acme", task_id=task_id)
    return next(scope for scope in state.scopes if scope.name == "task")


async def settled(budget: AsyncBudget, task_id: str, used_tokens: int) -> pb.ScopeState:
    """The task's scope once its usage reached ``used_tokens`` with nothing reserved (the success hook runs in the
    background after the call returns)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND
    while True:
        scope = await task_scope(budget, task_id)
        if (scope.used_tokens, scope.reserved_tokens) == (used_tokens, 0) or loop.time() > deadline:
            return scope
        await asyncio.sleep(0.05)


async def spend(budget: AsyncBudget, task_id: str, step_id: str, tokens: int) -> None:
    """A step that ran and spent ``tokens``, delivered before the next check."""
    async with budget.step(task_id, step_id, model="big", estimated_input_tokens=min(tokens, 3900)) as step:
        step.record_usage(input_tokens=tokens)
    assert await asyncio.to_thread(budget.reporter.flush, BOUND), "the reporter did not deliver"


async def test_allow_sends_the_call_as_asked_and_reports_its_usage(
    installed: BudgetwardenLogger, budget: AsyncBudget, server: ScriptedOpenAI
) -> None:
    server.script("big", Reply(text="Hello, budget.", reasoning_tokens=7, cached_tokens=4))
    reply = await call(server, "big", "t1", "s1", max_tokens=500)

    assert [(r.model, r.max_tokens) for r in server.requests] == [("big", 500)]
    usage = reply.usage
    assert usage.prompt_tokens == count_prompt_tokens(HELLO)
    assert (usage.completion_tokens_details.reasoning_tokens, usage.prompt_tokens_details.cached_tokens) == (7, 4)
    task = await settled(budget, "t1", usage.prompt_tokens + usage.completion_tokens)
    assert (task.used_tokens, task.reserved_tokens) == (usage.prompt_tokens + usage.completion_tokens, 0)
    # Cached input at its own price, reasoning within the output: $10, $2.5 and $30 per million tokens.
    cost = (usage.prompt_tokens - 4) * 10 + 4 * 2.5 + usage.completion_tokens * 30
    assert task.used_usd_micros == pytest.approx(cost, abs=1)


async def test_degrade_rewrites_the_model_caps_the_output_and_reports_the_cheaper_model(
    installed: BudgetwardenLogger, budget: AsyncBudget, server: ScriptedOpenAI
) -> None:
    await spend(budget, "t1", "s1", 3900)
    server.script("small", Reply(text="Cheaper hello."))
    reply = await call(server, "big", "t1", "s2", max_tokens=1500)  # 3900 + 1500: past the soft threshold, 5000

    assert [(r.model, r.max_tokens) for r in server.requests] == [("small", 200)]
    assert reply.model.endswith("small")
    spent = reply.usage.prompt_tokens + reply.usage.completion_tokens
    task = await settled(budget, "t1", 3900 + spent)
    assert (task.used_tokens, task.reserved_tokens) == (3900 + spent, 0)
    assert task.used_usd_micros == 3900 * 10 + reply.usage.prompt_tokens * 1 + reply.usage.completion_tokens * 4


async def test_checkpoint_refuses_before_any_request_and_passes_once_approved(
    installed: BudgetwardenLogger, budget: AsyncBudget, server: ScriptedOpenAI, running: RunningSidecar
) -> None:
    await spend(budget, "t1", "s1", 3950)
    await spend(budget, "t1", "s2", 3950)  # even degraded the next call passes the checkpoint line, 8000
    server.script("big", Reply(text="After approval."))

    with pytest.raises(CheckpointRequired) as caught:
        await call(server, "big", "t1", "s3", max_tokens=500)
    assert server.requests == []
    assert caught.value.remaining_tokens == 10000 - 7900

    assert running.settings.admin_listen
    with AdminClient(running.settings.admin_listen, timeout=30) as admin:
        admin.approve(caught.value.checkpoint_id, add_tokens=10000)
    reply = await call(server, "big", "t1", "s3", max_tokens=500)
    assert [r.model for r in server.requests] == ["big"]
    await settled(budget, "t1", 7900 + reply.usage.prompt_tokens + reply.usage.completion_tokens)


async def test_deny_refuses_before_any_request(
    running: RunningSidecar, server: ScriptedOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with AsyncBudget(running.addr, tenant_id="acme", timeout=30, task_type="plain") as budget:
        monkeypatch.setattr(litellm, "callbacks", [BudgetwardenLogger(budget)])
        server.script("big", Reply(text="never sent"))
        with pytest.raises(BudgetDenied) as caught:
            await call(server, "big", "t1", "s1", max_tokens=4500)  # the step cap is 4000
        assert caught.value.reason == pb.REASON_STEP_CAP_EXCEEDED
        assert server.requests == []
        task = await task_scope(budget, "t1")
        assert (task.used_tokens, task.reserved_tokens) == (0, 0)


async def test_a_failed_call_releases_its_reservation(
    installed: BudgetwardenLogger, budget: AsyncBudget, server: ScriptedOpenAI
) -> None:
    server.script("big")  # a known model with no reply left: the server answers 500
    with pytest.raises(litellm.InternalServerError):
        await call(server, "big", "t1", "s1", max_tokens=500, num_retries=0)
    assert len(server.requests) >= 1
    task = await settled(budget, "t1", 0)
    assert (task.used_tokens, task.reserved_tokens) == (0, 0)


async def test_a_stream_reports_the_usage_of_its_final_chunk(
    installed: BudgetwardenLogger, budget: AsyncBudget, server: ScriptedOpenAI
) -> None:
    server.script("big", Reply(text="Streamed hello to the budget.", reasoning_tokens=3))
    stream = await call(server, "big", "t1", "s1", max_tokens=500, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    usage = next(chunk.usage for chunk in reversed(chunks) if getattr(chunk, "usage", None))
    await settled(budget, "t1", usage.prompt_tokens + usage.completion_tokens)
    task = await task_scope(budget, "t1")
    assert (task.used_tokens, task.reserved_tokens) == (usage.prompt_tokens + usage.completion_tokens, 0)


async def test_a_logger_replacing_another_hears_of_its_calls(
    installed: BudgetwardenLogger, budget: AsyncBudget, server: ScriptedOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LiteLLM keeps one logger per class and public attributes in its success list: a second instance must not be
    taken for the first, or its calls would stay reserved."""
    server.script("big", Reply(text="first"), Reply(text="second"))
    first = await call(server, "big", "t1", "s1")
    spent = first.usage.prompt_tokens + first.usage.completion_tokens
    await settled(budget, "t1", spent)

    monkeypatch.setattr(litellm, "callbacks", [BudgetwardenLogger(budget)])
    second = await call(server, "big", "t1", "s2")
    spent += second.usage.prompt_tokens + second.usage.completion_tokens
    task = await settled(budget, "t1", spent)
    assert (task.used_tokens, task.reserved_tokens) == (spent, 0)


NO_NETWORK_SCRIPT = textwrap.dedent(
    """
    import asyncio, ipaddress, os, socket, sys

    def loopback(host):
        try:
            return host in ("localhost", None) or ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    refused = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, address):
        if isinstance(address, tuple) and not loopback(address[0]):
            refused.append(address)
            raise OSError(f"off the loopback: {address!r}")
        return connect(sock, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not loopback(host if not isinstance(host, bytes) else host.decode()):
            refused.append(host)
            raise OSError(f"lookup off the loopback: {host!r}")
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.getaddrinfo = guarded_connect, guarded_getaddrinfo
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    os.environ["LITELLM_OFFLINE_MODE"] = "true"
    import litellm
    from budgetwarden_client.integrations.litellm import BudgetwardenLogger

    reply = asyncio.run(
        litellm.acompletion(
            model="openai/big", api_base=sys.argv[1], api_key="test", messages=[{"role": "user", "content": "hi"}]
        )
    )
    print("refused:", refused)
    print("reply:", reply.choices[0].message.content)
    """
)


def test_litellm_makes_no_network_call(server: ScriptedOpenAI) -> None:
    """Importing LiteLLM and the integration and making a call touches nothing off the loopback."""
    server.script("big", Reply(text="offline"))
    env = {key: value for key, value in os.environ.items() if not key.startswith("OPENAI_")}
    done = subprocess.run(
        [sys.executable, "-c", NO_NETWORK_SCRIPT, server.base_url],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused: []" in done.stdout, done.stdout
    assert "reply: offline" in done.stdout
