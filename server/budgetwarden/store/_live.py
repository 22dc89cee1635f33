"""Live tasks: the tasks of a tenant that hold a reservation now, read from the tenant's lease index (lua/_lib.lua,
``leases``: reservation id -> lease expiry). The store keeps no list of a tenant's tasks (task keys are digests of
their ids), but every live reservation is in that index and names its task's key first in ``scopes``.

A read for display (the console): a few commands on one hash slot, not one script, so a figure may be a step behind
another; nothing is written."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from budgetwarden.domain import Counter

from ._codec import NONE, reply_text
from ._keys import TenantKeys
from ._store import AnyRedis

_TASK_FIELDS = ("task_id", "task_type", "limit", "used", "reserved", "limit_usd", "used_usd", "reserved_usd")


@dataclass(slots=True, kw_only=True)
class LiveTask:
    task_id: str
    task_type: str
    counter: Counter
    steps: list[str] = field(default_factory=list)  # the steps holding a reservation
    lease_until_ms: int = 0  # the latest of their leases


def _int(value: Any) -> int:
    return int(reply_text(value)) if value is not None else 0


def _limit(value: Any) -> int | None:
    return None if value is None or _int(value) == NONE else _int(value)


async def live_tasks(redis: AnyRedis, tenant_id: str, now_ms: int, *, limit: int = 200) -> list[LiveTask]:
    """The tasks holding the first ``limit`` live reservations (by lease expiry), with their counters."""
    keys = TenantKeys(tenant_id)
    reply = await redis.zrangebyscore(keys.leases, f"({now_ms}", "+inf", start=0, num=limit, withscores=True)
    held = cast(list[tuple[Any, float]], reply)
    if not held:
        return []
    async with redis.pipeline() as pipe:
        for member, _ in held:
            pipe.hmget(keys.resv_prefix + reply_text(member), "state", "scopes", "step_id")
        reservations: list[list[Any]] = await pipe.execute()
    by_task: dict[str, tuple[list[str], int]] = {}
    for (_, until), (state, scopes, step_id) in zip(held, reservations, strict=True):
        if reply_text(state or b"") != "reserved" or not scopes:
            continue
        task_key = reply_text(scopes).split(" ", 1)[0]
        steps, latest = by_task.get(task_key, ([], 0))
        steps.append(reply_text(step_id or b""))
        by_task[task_key] = (steps, max(latest, int(until)))
    async with redis.pipeline() as pipe:
        for task_key in by_task:
            pipe.hmget(task_key, *_TASK_FIELDS)
        tasks: list[list[Any]] = await pipe.execute()
    found = []
    for (steps, latest), values in zip(by_task.values(), tasks, strict=True):
        task_id, task_type, lim, used, reserved, lim_usd, used_usd, reserved_usd = values
        if task_id is None:
            continue  # expired between the two reads
        counter = Counter(
            limit=_limit(lim),
            used=_int(used),
            reserved=_int(reserved),
            limit_usd=_limit(lim_usd),
            used_usd=_int(used_usd),
            reserved_usd=_int(reserved_usd),
        )
        found.append(
            LiveTask(
                task_id=reply_text(task_id),
                task_type=reply_text(task_type or b""),
                counter=counter,
                steps=sorted(steps),
                lease_until_ms=latest,
            )
        )
    return sorted(found, key=lambda task: task.task_id)
