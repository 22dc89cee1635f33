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
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

import litellm  # after the environment above, which keeps it offline
import openai
import pytest

from budgetwarden_client import AdminClient, AsyncBudget, Budget, BudgetDenied, CheckpointRequired, pb
from budgetwarden_client.integrations.litellm import BudgetwardenLogger, budgeted_completion
from scripted_openai import Reply, ScriptedOpenAI, count_prompt_tokens

from support import RunningSidecar, free_port
from support_policies import AGENT_POLICY, start_with_policy

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
    return start_with_policy(start_sidecar, tmp_path, AGENT_POLICY)


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


# --- the sync SDK path: budgeted_completion --------------------------------------------------------------------------


@pytest.fixture
def sync_budget(running: RunningSidecar) -> Iterator[Budget]:
    with Budget(running.addr, tenant_id="acme", timeout=30) as b:
        yield b


def sync_task(budget: Budget, task_id: str) -> pb.ScopeState:
    assert budget.reporter.flush(timeout=BOUND), "the reporter did not deliver"
    state = budget.client.get_budget(tenant_id="acme", task_id=task_id)
    return next(scope for scope in state.scopes if scope.name == "task")


def sync_call(server: ScriptedOpenAI, budget: Budget, model: str, task_id: str, step_id: str, **kwargs: Any) -> Any:
    completion = budgeted_completion(budget)
    return completion(
        model=f"openai/{model}",
        api_base=server.base_url,
        api_key="test",
        messages=kwargs.pop("messages", HELLO),
        metadata={"budgetwarden_task_id": task_id, "budgetwarden_step_id": step_id},
        **kwargs,
    )


def test_sync_completion_is_checked_and_reports_its_usage(sync_budget: Budget, server: ScriptedOpenAI) -> None:
    server.script("big", Reply(text="Hello, budget.", reasoning_tokens=7, cached_tokens=4))
    reply = sync_call(server, sync_budget, "big", "t1", "s1", max_tokens=500)
    assert [(r.model, r.max_tokens) for r in server.requests] == [("big", 500)]
    spent = reply.usage.prompt_tokens + reply.usage.completion_tokens
    task = sync_task(sync_budget, "t1")
    assert (task.used_tokens, task.reserved_tokens) == (spent, 0)
    assert task.used_usd_micros == pytest.approx(
        (reply.usage.prompt_tokens - 4) * 10 + 4 * 2.5 + reply.usage.completion_tokens * 30, abs=1
    )


def test_sync_completion_degrades_and_refuses_before_sending(sync_budget: Budget, server: ScriptedOpenAI) -> None:
    with sync_budget.step("t1", "s0", model="big", estimated_input_tokens=3950) as step:
        step.record_usage(input_tokens=3950)
    assert sync_task(sync_budget, "t1").reserved_tokens == 0
    server.script("small", Reply(text="Cheaper hello."))
    sync_call(server, sync_budget, "big", "t1", "s1", max_tokens=1500)  # past the soft threshold
    assert [(r.model, r.max_tokens) for r in server.requests] == [("small", 200)]

    with sync_budget.step("t1", "s2", model="big", estimated_input_tokens=3950) as step:
        step.record_usage(input_tokens=3950)  # even degraded, the next call passes the checkpoint line, 8000
    assert sync_task(sync_budget, "t1").reserved_tokens == 0
    with pytest.raises(CheckpointRequired):
        sync_call(server, sync_budget, "big", "t1", "s3", max_tokens=500)
    assert len(server.requests) == 1  # the refused call sent nothing
    assert sync_task(sync_budget, "t1").reserved_tokens == 0


def test_a_sync_stream_reports_its_final_usage(sync_budget: Budget, server: ScriptedOpenAI) -> None:
    server.script("big", Reply(text="Streamed hello to the budget."))
    stream = sync_call(server, sync_budget, "big", "t1", "s1", max_tokens=500, stream=True)
    chunks = list(stream)
    usage = next(chunk.usage for chunk in reversed(chunks) if getattr(chunk, "usage", None))
    assert server.requests[0].body["stream_options"] == {"include_usage": True}
    task = sync_task(sync_budget, "t1")
    assert (task.used_tokens, task.reserved_tokens) == (usage.prompt_tokens + usage.completion_tokens, 0)


def test_a_sync_call_that_fails_releases_its_reservation(sync_budget: Budget, server: ScriptedOpenAI) -> None:
    server.script("big")  # no reply left: the server answers 500
    with pytest.raises(litellm.InternalServerError):
        sync_call(server, sync_budget, "big", "t1", "s1", max_tokens=500, num_retries=0)
    task = sync_task(sync_budget, "t1")
    assert (task.used_tokens, task.reserved_tokens) == (0, 0)


# --- the LiteLLM proxy, with the logger as its callback ---------------------------------------------------------------

PROXY_KEY = "sk-budgetwarden-tests-0123456789abcdef0123456789abcdef"
# The proxy in a process of its own, refusing any connection or lookup off the loopback from the start.
PROXY_LAUNCHER = NO_NETWORK_SCRIPT.split("import litellm\n")[0] + textwrap.dedent(
    """
    from litellm.proxy.proxy_cli import run_server

    sys.argv = ["litellm", *sys.argv[1:]]
    run_server()
    """
)


@pytest.fixture
def proxy(running: RunningSidecar, server: ScriptedOpenAI, tmp_path: Path) -> Iterator[str]:
    """A real LiteLLM proxy (``litellm --config``) routing ``big`` and ``small`` to the scripted server, with a
    ``BudgetwardenLogger`` (tenant acme, task type plain) as its callback. Yields its base URL."""
    (tmp_path / "budget_callbacks.py").write_text(
        "from budgetwarden_client.integrations.litellm import BudgetwardenLogger\n"
        "budget_handler = BudgetwardenLogger(timeout=30, task_type='plain')\n"
    )
    models = "\n".join(
        f"  - model_name: {name}\n    litellm_params: {{model: openai/{name}, api_base: '{server.base_url}'}}"
        for name in ("big", "small")
    )
    config = tmp_path / "config.yaml"
    config.write_text(f"model_list:\n{models}\nlitellm_settings:\n  callbacks: budget_callbacks.budget_handler\n")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("OPENAI_")}
    env.update(
        BUDGETWARDEN_ADDR=running.addr,
        BUDGETWARDEN_TENANT="acme",
        LITELLM_MASTER_KEY=PROXY_KEY,
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_OFFLINE_MODE="true",
        OPENAI_API_KEY="test",  # the scripted server's (the proxy's own key is LITELLM_MASTER_KEY)
        PYTHONPATH=os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]),
    )
    log = (tmp_path / "proxy.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", PROXY_LAUNCHER, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_live(process, base_url, tmp_path / "proxy.log")
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=BOUND)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=BOUND)
        log.close()


PROXY_STARTUP_BOUND = 300.0  # seconds: the proxy imports a great deal; generous for a busy 2-core machine


def wait_until_live(process: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    deadline = time.monotonic() + PROXY_STARTUP_BOUND
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the proxy exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{base_url}/health/liveliness", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the proxy did not start in {PROXY_STARTUP_BOUND} s: {log.read_text()[-3000:]}")


@pytest.mark.slow
def test_the_proxy_allows_reports_and_denies(proxy: str, server: ScriptedOpenAI, sync_budget: Budget) -> None:
    server.script("big", Reply(text="Hello through the proxy.", cached_tokens=4))
    metadata = {"budgetwarden_task_id": "t1", "budgetwarden_step_id": "s1"}
    with openai.OpenAI(base_url=proxy, api_key=PROXY_KEY, max_retries=0, timeout=BOUND) as client:
        reply = client.chat.completions.create(
            model="big",
            messages=HELLO,
            max_tokens=500,
            extra_body={"metadata": metadata},  # type: ignore[arg-type]
        )
        assert reply.choices[0].message.content == "Hello through the proxy."
        assert [(r.model, r.max_tokens) for r in server.requests] == [("big", 500)]
        assert reply.usage is not None
        spent = reply.usage.prompt_tokens + reply.usage.completion_tokens
        # Reported by the proxy's logger, in the proxy's process: wait for it to land.
        deadline = time.monotonic() + BOUND
        while (task := sync_task(sync_budget, "t1")).used_tokens != spent and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (task.used_tokens, task.reserved_tokens) == (spent, 0)

        metadata["budgetwarden_step_id"] = "s2"
        with pytest.raises(openai.RateLimitError) as refused:  # 4500 output tokens: over the 4000 step cap
            client.chat.completions.create(
                model="big",
                messages=HELLO,
                max_tokens=4500,
                extra_body={"metadata": metadata},  # type: ignore[arg-type]
            )
    assert refused.value.status_code == 429  # the hook's answer, not the 500 the proxy gives an unknown exception
    assert "above the per-step cap" in refused.value.message
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["provider_specific_fields"]["budgetwarden"]["decision"] == "deny"
    assert len(server.requests) == 1  # nothing reached the model
    assert sync_task(sync_budget, "t1").reserved_tokens == 0
