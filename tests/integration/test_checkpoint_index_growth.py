"""The index of open checkpoints (`<p>ckpt:open`) stays bounded with nobody listing it (issue 16, found by
bench/soak.py): an opening drops members whose task expired, and keeps those a task still holds open. Real sidecar,
real Valkey; the sidecar's clock is set, and a task's expiry is done by deleting its key (as Redis would)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from budgetwarden.store import TenantKeys

from support import RunningSidecar
from support_admin import TWO_TENANTS_POLICY, open_checkpoint


@pytest.fixture
def running(tmp_path: Path, start_sidecar: Callable[..., RunningSidecar]) -> RunningSidecar:
    policy = tmp_path / "policy.yaml"
    policy.write_text(TWO_TENANTS_POLICY)
    return start_sidecar(policy_file=policy)


def open_index(sync_redis: redis.Redis, tenant: str = "acme") -> list[str]:
    return [member.decode() for member in sync_redis.zrange(TenantKeys(tenant).checkpoints_open, 0, -1)]


def expire_task(sync_redis: redis.Redis, task: str, checkpoint: str, *, with_record: bool) -> None:
    """What the task retention does to a task nobody checks any more (and, later, to its checkpoint's record)."""
    keys = TenantKeys("acme")
    assert sync_redis.delete(keys.task(task)) == 1
    if with_record:
        assert sync_redis.delete(f"{keys.prefix}ckpt:{hashlib.sha1(checkpoint.encode()).hexdigest()}") == 1


def past_the_retention(running: RunningSidecar) -> None:
    running.clock.advance(running.settings.task_retention_seconds + 1)  # type: ignore[attr-defined]


@pytest.mark.parametrize("with_record", [False, True], ids=["task expired", "task and checkpoint record expired"])
def test_an_opening_drops_open_checkpoints_whose_task_expired(
    running: RunningSidecar, sync_redis: redis.Redis, with_record: bool
) -> None:
    stale = [open_checkpoint(running.addr, "acme", f"old-{n}") for n in range(6)]
    for n, checkpoint in enumerate(stale):
        expire_task(sync_redis, f"old-{n}", checkpoint, with_record=with_record)
    assert open_index(sync_redis) == sorted(stale)  # nobody listed: still there
    past_the_retention(running)
    fresh = [open_checkpoint(running.addr, "acme", f"new-{n}") for n in range(2)]
    assert open_index(sync_redis) == fresh  # the two openings dropped the six expired ones


def test_an_opening_keeps_an_old_checkpoint_its_task_still_waits_on(
    running: RunningSidecar, sync_redis: redis.Redis
) -> None:
    waiting = open_checkpoint(running.addr, "acme", "waiting")
    past_the_retention(running)
    # The task is still checked (each check stopped by its checkpoint keeps it alive), so its checkpoint stays open.
    assert open_checkpoint(running.addr, "acme", "waiting", step="s2") == waiting
    fresh = open_checkpoint(running.addr, "acme", "another")
    assert open_index(sync_redis) == [waiting, fresh]


def test_a_tenant_that_keeps_opening_checkpoints_keeps_a_bounded_index(
    running: RunningSidecar, sync_redis: redis.Redis
) -> None:
    """The soak's pattern: tasks reach a checkpoint, nobody answers or lists, the tasks expire, new ones come."""
    live = 3
    for round_ in range(8):
        opened = [open_checkpoint(running.addr, "acme", f"r{round_}-{n}") for n in range(live)]
        for n, checkpoint in enumerate(opened):
            expire_task(sync_redis, f"r{round_}-{n}", checkpoint, with_record=round_ % 2 == 0)
        past_the_retention(running)
    assert len(open_index(sync_redis)) <= live
