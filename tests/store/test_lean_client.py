"""The lean client for checks' script calls (store/_lean.py, ``--lean-redis-client``) answers what redis-py answers,
recovers a flushed script cache, fails the calls waiting on a killed connection and connects again, keeps its replies
in order when a caller gives up, and authenticates and selects its database as redis-py does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import hypothesis.strategies as st
import pytest
import redis.exceptions
from hypothesis import HealthCheck, given, settings
from redis.asyncio import Redis
from test_check_many import NOW, POLICY, checks, comparable

from budgetwarden.app import Settings
from budgetwarden.app._redis_clients import lean_scripts, redis_client
from budgetwarden.domain._model import CheckInput, Decision
from budgetwarden.limiter import Limiter, StepConflictError
from budgetwarden.store import LeanScripts, lean_scripts_for
from budgetwarden.store._store import BudgetStore

ECHO = "return ARGV[1]"
GENEROUS_S = 30.0


def limiter(store: BudgetStore, *, batch: bool = True) -> Limiter:
    return Limiter(
        store, lambda: POLICY, clock=lambda: NOW, check_deadline_s=GENEROUS_S, store_deadline_s=GENEROUS_S,
        batch_unary=batch,
    )  # fmt: skip


async def answers(checker: Limiter, requests: list[CheckInput], *, together: bool) -> list[dict[str, Any]]:
    """The checks one after another, or all arriving together (batched, they are decided in the order they came)."""

    async def one(request: CheckInput) -> Any:
        try:
            return await checker.check(request)
        except StepConflictError as exc:
            return exc

    if together:
        return [comparable(answer) for answer in await asyncio.gather(*(one(r) for r in requests))]
    return [comparable(await one(request)) for request in requests]


async def counters(redis: Redis) -> dict[bytes, Any]:
    """Every key's contents: the two paths must leave the same state behind."""
    state: dict[bytes, Any] = {}
    for key in sorted(await redis.keys("*")):
        kind = (await redis.type(key)).decode()
        if kind == "hash":
            state[key] = await redis.hgetall(key)
        elif kind == "zset":
            state[key] = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "string":
            state[key] = await redis.get(key)
        else:
            state[key] = kind
    return state


@pytest.fixture
async def lean(async_redis: Redis) -> AsyncIterator[LeanScripts]:
    client = lean_scripts_for(async_redis, socket_timeout=GENEROUS_S)
    assert client is not None
    yield client
    await client.aclose()


async def wait_until(condition: Any, what: str) -> None:
    for _ in range(3000):
        if await condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"waited 30 s for {what}")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(checks, min_size=1, max_size=20), batch=st.booleans())
async def test_the_lean_client_answers_what_redis_py_answers(
    async_redis: Redis, requests: list[CheckInput], batch: bool
) -> None:
    """The same checks through redis-py one by one and through the lean client (one by one, or arriving together and
    batched): the same answers (decisions, counters, replays, refusals) and the same keys left behind."""
    await async_redis.flushall()
    by_redis_py = await answers(limiter(BudgetStore(async_redis), batch=False), requests, together=False)
    state_redis_py = await counters(async_redis)
    await async_redis.flushall()
    client = lean_scripts_for(async_redis, socket_timeout=GENEROUS_S)
    assert client is not None
    try:
        by_lean = await answers(limiter(BudgetStore(async_redis, lean=client), batch=batch), requests, together=batch)
    finally:
        await client.aclose()
    assert by_lean == by_redis_py
    assert await counters(async_redis) == state_redis_py


async def test_a_flushed_script_cache_is_loaded_again(async_redis: Redis, lean: LeanScripts) -> None:
    store = BudgetStore(async_redis, lean=lean)
    checker = limiter(store)
    first = await checker.check(step("s1"))
    await async_redis.script_flush()
    second = await checker.check(step("s2"))
    assert [first.verdict.decision, second.verdict.decision] == [Decision.ALLOW, Decision.ALLOW]
    assert not first.from_fail_mode
    assert not second.from_fail_mode
    assert (await async_redis.script_exists(store._check.sha)) == [True]


async def test_an_error_reply_raises_what_redis_py_raises(async_redis: Redis, lean: LeanScripts) -> None:
    failing = async_redis.register_script("return redis.error_reply('BWCONFLICT 3')")
    with pytest.raises(redis.exceptions.ResponseError) as by_redis_py:
        await failing(keys=[], args=[])
    with pytest.raises(redis.exceptions.ResponseError) as by_lean:
        await lean.run(failing, [], [])
    assert type(by_lean.value) is type(by_redis_py.value)
    assert str(by_lean.value) == str(by_redis_py.value)
    echo = async_redis.register_script(ECHO)
    assert await lean.run(echo, [], ["after"]) == b"after"  # the connection goes on


async def paused_writes(redis: Redis) -> None:
    """Scripts (write commands) wait in Valkey until unpaused; CLIENT commands still run."""
    await redis.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")


async def blocked_clients(redis: Redis) -> int:
    """Clients whose command waits (here: for the pause to end)."""
    return int((await redis.info("clients"))["blocked_clients"])


async def test_a_killed_connection_fails_the_calls_on_it_and_the_next_call_connects_again(
    async_redis: Redis, lean: LeanScripts
) -> None:
    echo = async_redis.register_script(ECHO)
    assert await lean.run(echo, [], ["warm"]) == b"warm"
    await paused_writes(async_redis)
    try:
        pending = [asyncio.ensure_future(lean.run(echo, [], [f"call-{i}"])) for i in range(3)]
        await wait_until(lambda: blocked_clients_at_least(async_redis, 1), "the calls to wait in Valkey")
        assert not any(call.done() for call in pending)
        mine = await async_redis.client_id()
        for client in await async_redis.client_list():
            if int(client["id"]) != mine:
                await async_redis.execute_command("CLIENT", "KILL", "ID", client["id"])
        outcomes = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), GENEROUS_S)
    finally:
        await async_redis.execute_command("CLIENT", "UNPAUSE")
    assert all(isinstance(outcome, redis.exceptions.ConnectionError) for outcome in outcomes), outcomes
    assert await lean.run(echo, [], ["again"]) == b"again"


async def blocked_clients_at_least(redis: Redis, count: int) -> bool:
    return await blocked_clients(redis) >= count


async def test_a_call_given_up_on_does_not_shift_the_replies_of_the_others(
    async_redis: Redis, lean: LeanScripts
) -> None:
    echo = async_redis.register_script(ECHO)
    assert await lean.run(echo, [], ["warm"]) == b"warm"
    await paused_writes(async_redis)
    try:
        calls = [asyncio.ensure_future(lean.run(echo, [], [f"call-{i}"])) for i in range(4)]
        await wait_until(lambda: blocked_clients_at_least(async_redis, 1), "the calls to wait in Valkey")
        calls[0].cancel()
        calls[2].cancel()
    finally:
        await async_redis.execute_command("CLIENT", "UNPAUSE")
    assert await asyncio.wait_for(asyncio.gather(calls[1], calls[3]), GENEROUS_S) == [b"call-1", b"call-3"]
    assert calls[0].cancelled()
    assert calls[2].cancelled()
    assert await lean.run(echo, [], ["next"]) == b"next"


async def test_a_check_given_up_on_by_its_deadline_does_not_shift_the_next_checks(
    async_redis: Redis, lean: LeanScripts
) -> None:
    """The limiter's own deadline cancels a check's call (its fail mode answers); the checks after it get their own
    answers, not its reply."""
    store = BudgetStore(async_redis, lean=lean)
    checker = limiter(store, batch=False)
    await checker.check(step("warm"))
    await paused_writes(async_redis)
    try:
        late = asyncio.ensure_future(checker.check(step("late", tokens=111), deadline_s=0.2))
        result = await asyncio.wait_for(late, GENEROUS_S)
        assert result.from_fail_mode
        on_time = asyncio.ensure_future(checker.check(step("on-time", tokens=222)))
        await wait_until(lambda: blocked_clients_at_least(async_redis, 1), "the check to wait in Valkey")
    finally:
        await async_redis.execute_command("CLIENT", "UNPAUSE")
    answer = await asyncio.wait_for(on_time, GENEROUS_S)
    assert not answer.from_fail_mode
    assert answer.verdict.decision is Decision.ALLOW
    assert answer.verdict.granted == 222


async def test_a_connection_stalled_past_the_socket_timeout_is_replaced(async_redis: Redis) -> None:
    """redis-py's socket timeout is the backstop under the limiter's deadlines: a call whose oldest reply is overdue
    fails (TimeoutError, the fail mode) and the next call goes on a new connection."""
    client = lean_scripts_for(async_redis, socket_timeout=0.05)
    assert client is not None
    echo = async_redis.register_script(ECHO)
    try:
        assert await client.run(echo, [], ["warm"]) == b"warm"
        await paused_writes(async_redis)
        try:
            stalled = asyncio.ensure_future(client.run(echo, [], ["stalled"]))
            await wait_until(lambda: blocked_clients_at_least(async_redis, 1), "the call to wait in Valkey")
            await asyncio.sleep(0.2)  # past the socket timeout, whatever the machine's load
            fresh = asyncio.ensure_future(client.run(echo, [], ["fresh"]))
            with pytest.raises(redis.exceptions.TimeoutError):
                await asyncio.wait_for(stalled, GENEROUS_S)
        finally:
            await async_redis.execute_command("CLIENT", "UNPAUSE")
        assert await asyncio.wait_for(fresh, GENEROUS_S) == b"fresh"
    finally:
        await client.aclose()


async def test_an_acl_user_and_a_database_from_the_url(async_redis: Redis, redis_url: str) -> None:
    await async_redis.execute_command("ACL", "SETUSER", "lean-user", "on", ">lean-secret", "~*", "+@all")
    url = redis_url.replace("redis://", "redis://lean-user:lean-secret@").rstrip("/") + "/3"
    authed = Redis.from_url(url)
    client = lean_scripts_for(authed, socket_timeout=GENEROUS_S)
    assert client is not None
    try:
        echo = authed.register_script("return redis.call('SET', KEYS[1], ARGV[1])")
        await client.run(echo, ["lean-key"], ["x"])
        assert await authed.get("lean-key") == b"x"
        assert await async_redis.get("lean-key") is None  # it went to database 3, not 0
        wrong = Redis.from_url(url.replace("lean-secret", "wrong"))
        refused = lean_scripts_for(wrong, socket_timeout=GENEROUS_S)
        assert refused is not None
        with pytest.raises(redis.exceptions.AuthenticationError):
            await refused.run(echo, ["lean-key"], ["y"])
        await refused.aclose()
        await wrong.aclose()
    finally:
        await client.aclose()
        await authed.flushdb()
        await authed.aclose()
        await async_redis.execute_command("ACL", "DELUSER", "lean-user")


async def test_failed_connects_back_off(lean: LeanScripts, async_redis: Redis) -> None:
    unreachable = Redis(host="127.0.0.1", port=1, socket_connect_timeout=GENEROUS_S)
    client = lean_scripts_for(unreachable, socket_timeout=GENEROUS_S)
    assert client is not None
    echo = async_redis.register_script(ECHO)
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.run(echo, [], ["x"])
        with pytest.raises(redis.exceptions.ConnectionError, match="waiting to connect again"):
            await client.run(echo, [], ["x"])
    finally:
        await client.aclose()
        await unreachable.aclose()


def test_redis_py_stays_where_the_lean_client_does_not_apply(redis_url: str) -> None:
    """Off by default; with --durability (its confirmation follows each script call on redis-py's connections), with
    a Cluster and with a master behind Sentinel, the lean client is not made."""
    client = Redis.from_url(redis_url)
    on = {"redis_url": redis_url, "lean_redis_client": True}
    assert (
        lean_scripts(Settings(redis_url=redis_url, lean_redis_client=False), client, embedded=False, socket_timeout=1.0)
        is None
    )
    assert lean_scripts(Settings(**on), client, embedded=False, socket_timeout=1.0) is not None
    assert lean_scripts(Settings(**on, durability="aof-local"), client, embedded=False, socket_timeout=1.0) is None
    assert lean_scripts(Settings(**on, redis_cluster=True), client, embedded=False, socket_timeout=1.0) is None
    behind_sentinel = redis_client("redis+sentinel://127.0.0.1:1/mymaster", cluster=False)  # connects only when used
    assert lean_scripts(Settings(**on), behind_sentinel, embedded=False, socket_timeout=1.0) is None


def step(step_id: str, tokens: int = 100) -> CheckInput:
    return CheckInput(
        tenant_id="acme",
        task_id="t1",
        step_id=step_id,
        task_type="plain",
        model="small",
        input_tokens=tokens,
        output_tokens=0,
        tool_calls=0,
    )
