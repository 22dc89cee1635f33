"""check.lua's argument for each step, as BudgetStore.check_call packs it: the step's fields joined by the separator,
whether its steps share their parts (as the limiter's steps of one kind do: it packs those once) or not. The reference
below is the packing as it was before it was memoised, field by field."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import redis.asyncio

from budgetwarden.domain import Scope, ScopeKind, Thresholds, Window, WindowSpan
from budgetwarden.store import StepCheck
from budgetwarden.store._codec import FIELD_SEPARATOR, field_text, limit_arg
from budgetwarden.store._keys import checkpoint_prefix, digest, reservation_id
from budgetwarden.store._store import BudgetStore

NOW = 1_796_000_000_000
TENANT = "acme corp"
SPAN = WindowSpan(window=Window.DAY, label="2026-11-30", start_ms=NOW - 1000, end_ms=NOW + 86_400_000)
WINDOWS = (Scope(name="tenant.day", kind=ScopeKind.TENANT_WINDOW, limit=10**9, span=SPAN, limit_usd=5),)
TASK = Scope(name="task", kind=ScopeKind.TASK, limit=100_000)
UNLIMITED_TASK = Scope(name="task", kind=ScopeKind.TASK, limit=None, limit_usd=9_000)
ONE = [(1000, 20, 0, "1 2 3 gpt ALLOW", "0\x1e\x1egpt\x1e800\x1e200\x1e0")]
TWO = [*ONE, (500, 9, 1, "1 2 3 mini DEGRADE:cheap\x01er", "1\x1echeap\x1emini\x1e400\x1e100\x1e0")]


def reference(step: StepCheck) -> str:
    task, thresholds = step.task, step.thresholds
    parts = [
        str(NOW + step.lease_ms),
        str(limit_arg(task.limit)),
        str(limit_arg(task.limit_usd)),
        str(limit_arg(thresholds.soft_bp)),
        str(limit_arg(thresholds.checkpoint_bp)),
        step.task_id,
        field_text(step.task_type),
        step.step_id,
        checkpoint_prefix(TENANT, step.task_id),
        step.fingerprint,
        step.answer,
    ]
    for tokens, usd, bound, label, answer in step.candidates:
        parts += (str(tokens), str(usd), str(bound), field_text(label), answer)
    return FIELD_SEPARATOR.join(parts)


def steps() -> list[StepCheck]:
    shared = StepCheck(
        task_id="t",
        step_id="s",
        task_type="agent",
        task=TASK,
        thresholds=Thresholds(8000, 9000),
        candidates=TWO,
        lease_ms=600_000,
        fingerprint="fp-a",
        answer="100\x1e-1\x1e-1\x1e3",
    )
    made = [replace(shared, task_id=f"task-{n % 3}", step_id=f"step-{n}") for n in range(5)]  # sharing every part
    # The same candidates object with another part changed: packed on its own, not from the shared parts.
    made += [
        replace(shared, step_id="lease", lease_ms=1000),
        replace(shared, step_id="task", task=UNLIMITED_TASK),
        replace(shared, step_id="thresholds", thresholds=Thresholds()),
        replace(shared, step_id="type", task_type="ag\x02ent"),
        replace(shared, step_id="fingerprint", fingerprint="fp-b"),
        replace(shared, step_id="answer", answer="7\x1e-1\x1e-1\x1e3"),
        replace(shared, step_id="again"),  # back to the first kind after the others
    ]
    # Equal parts in other objects, fewer candidates, none.
    made += [
        replace(shared, step_id="copy", candidates=list(TWO), fingerprint="".join(["fp", "-a"])),
        replace(shared, step_id="one", candidates=ONE),
        replace(shared, step_id="none", candidates=[]),
        replace(shared, task_id="t\u00e9", step_id="unicode \u4e2d"),
    ]
    return made


def test_each_steps_argument_is_its_fields_joined_whatever_its_steps_share() -> None:
    store = BudgetStore(redis.asyncio.Redis())  # never connected: only packs
    made = steps()
    keys, args, ids = store.check_call(TENANT, WINDOWS, made, NOW)
    per_step = args[5 + 3 * len(WINDOWS) :]
    assert per_step == [reference(step) for step in made]
    assert ids == [reservation_id(step.task_id, step.step_id) for step in made]
    assert len(keys) == 1 + len(WINDOWS) + 2 * len(made)


def reference_digest(*parts: str) -> str:
    """The digest as stored ids were always made: blake2b-128, updated with each part's 4-byte length and the part."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        data = part.encode()
        h.update(len(data).to_bytes(4, "big"))
        h.update(data)
    return h.hexdigest()


def test_a_reservation_id_is_the_length_prefixed_digest_of_its_task_and_step() -> None:
    # Stored reservations are found by these ids: the one-update digest must make exactly the bytes it always made.
    for task_id, step_id in [
        ("t", "s"),
        ("", ""),
        ("t\u00e9", "unicode \u4e2d"),
        ("ab", "c"),
        ("a", "bc"),
        ("x" * 300, "y"),
    ]:
        assert reservation_id(task_id, step_id) == reference_digest(task_id, step_id)
    assert reservation_id("ab", "c") != reservation_id("a", "bc")
    assert digest("t") == reference_digest("t")
    assert digest() == reference_digest()
