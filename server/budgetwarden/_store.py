"""Budget storage in Redis: every mutation is one Lua script, one round trip, atomic across all scopes of a step."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from budgetwarden._keys import TenantKeys, reservation_id
from budgetwarden._model import Counter, ReleaseStatus, ReportStatus, Scope, UsageInput

AnyRedis = Redis | RedisCluster
_NONE = -1


def load_lua(name: str) -> str:
    """A script's source: the shared helpers followed by the script itself."""
    lua = resources.files("budgetwarden.lua")
    return lua.joinpath("_lib.lua").read_text() + "\n" + lua.joinpath(f"{name}.lua").read_text()


def _limit_arg(limit: int | None) -> int:
    return _NONE if limit is None else limit


def _counter(limit: Any, used: Any, reserved: Any) -> Counter:
    limit = int(limit)
    return Counter(None if limit == _NONE else limit, int(used), int(reserved))


def _counters(flat: Sequence[Any]) -> tuple[Counter, ...]:
    return tuple(_counter(*flat[i : i + 3]) for i in range(0, len(flat), 3))


@dataclass(frozen=True, slots=True)
class Retention:
    """How long the store keeps things, in milliseconds."""

    record_ms: int = 86_400_000
    task_ms: int = 7 * 86_400_000
    idempotency_ms: int = 86_400_000
    window_grace_ms: int = 3_600_000


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a check did in the store."""

    status: int  # 1 reserved now, 2 replayed, 0 nothing reserved
    fitted: int | None
    granted: int
    lease_expires_ms: int
    reservation_id: str
    counters: tuple[Counter, ...]

    @property
    def replayed(self) -> bool:
        return self.status == 2


@dataclass(frozen=True, slots=True)
class Applied:
    """What a usage record did in the store."""

    status: ReportStatus
    reservation_id: str
    charged: int
    refunded: int
    overage: int
    task: Counter | None


@dataclass(frozen=True, slots=True)
class BudgetState:
    task_known: bool
    task_type: str
    active_reservations: int
    counters: tuple[Counter, ...]


class BudgetStore:
    """The Redis side. Scripts are redis-py ``Script`` objects: EVALSHA, with a fallback to EVAL on NOSCRIPT."""

    def __init__(self, redis: AnyRedis, retention: Retention | None = None) -> None:
        self.redis = redis
        self.retention = retention or Retention()
        self._check = self._script("check")
        self._report = self._script("report")
        self._release = self._script("release")
        self._budget = self._script("budget")

    def _script(self, name: str) -> AsyncScript:
        return self.redis.register_script(load_lua(name))

    async def reserve(
        self,
        *,
        tenant_id: str,
        task_id: str,
        step_id: str,
        task_type: str,
        requested: int,
        task_limit: int | None,
        windows: Sequence[Scope],
        candidates: Sequence[int],
        now_ms: int,
        lease_ms: int,
    ) -> Reservation:
        keys = TenantKeys(tenant_id)
        rid = reservation_id(task_id, step_id)
        lease_until = now_ms + lease_ms
        script_keys = [keys.reservation(rid), keys.leases, keys.task(task_id)]
        args: list[Any] = [
            now_ms,
            lease_until,
            self.retention.record_ms,
            keys.resv_prefix,
            self.retention.task_ms,
            _limit_arg(task_limit),
            task_id,
            task_type,
            step_id,
            requested,
        ]
        for scope in windows:
            assert scope.span is not None
            script_keys.append(keys.window(scope.span))
            args += (_limit_arg(scope.limit), scope.span.end_ms + self.retention.window_grace_ms)
        args.append(len(candidates))
        args += candidates
        reply = await self._check(keys=script_keys, args=args)
        status, fitted, granted, lease = (int(v) for v in reply[:4])
        return Reservation(
            status,
            None if fitted < 0 else fitted,
            granted,
            lease,
            rid if status else "",
            _counters(reply[4:]),
        )

    async def report(self, records: Sequence[tuple[UsageInput, str, Sequence[Scope]]], now_ms: int) -> list[Applied]:
        """Apply usage records in one pipeline; each record is atomic on its own.

        Each entry is (record, task key id or "", the tenant windows current at the record's time).
        """
        if not records:
            return []
        calls: list[tuple[list[str], list[Any]]] = []
        ids: list[str] = []
        for record, task_id, windows in records:
            keys = TenantKeys(record.tenant_id)
            rid = record.reservation_id or reservation_id(record.task_id, record.step_id)
            ids.append(rid)
            # Without a key, report.lua completes the marker with the reservation's generation.
            marker = keys.idempotency(record.idempotency_key) if record.idempotency_key else keys.keyless_marker(rid)
            script_keys = [keys.reservation(rid), keys.leases, marker]
            untils: list[int] = []
            if task_id:
                script_keys.append(keys.task(task_id))
                untils.append(0)
            for scope in windows:
                assert scope.span is not None
                script_keys.append(keys.window(scope.span))
                untils.append(scope.span.end_ms + self.retention.window_grace_ms)
            args: list[Any] = [
                now_ms,
                self.retention.idempotency_ms,
                record.tokens,
                keys.resv_prefix,
                1 if task_id else 0,
                self.retention.task_ms,
                task_id,
                record.task_type,
                0 if record.idempotency_key else 1,
                *untils,
            ]
            calls.append((script_keys, args))
        replies = await self._run_all(self._report, calls)
        applied = []
        for rid, reply in zip(ids, replies, strict=True):
            status, charged, refunded, overage = (int(v) for v in reply[:4])
            task = _counter(*reply[5:8]) if int(reply[4]) else None
            applied.append(Applied(ReportStatus(status), rid, charged, refunded, overage, task))
        return applied

    async def _run_all(self, script: AsyncScript, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run many script calls: one pipeline on a single node; concurrently on a cluster, where redis-py does not
        pipeline EVALSHA (each call still goes straight to the node owning its tenant's slot)."""
        if isinstance(self.redis, RedisCluster):
            return list(await asyncio.gather(*(script(keys=keys, args=args) for keys, args in calls)))
        pipe = self.redis.pipeline(transaction=False)
        for keys, args in calls:
            await script(keys=keys, args=args, client=cast(Redis, pipe))
        return list(await pipe.execute())

    async def release(self, tenant_id: str, rid: str, now_ms: int) -> tuple[ReleaseStatus, int]:
        keys = TenantKeys(tenant_id)
        reply = await self._release(keys=[keys.reservation(rid), keys.leases], args=[now_ms, keys.resv_prefix])
        return ReleaseStatus(int(reply[0])), int(reply[1])

    async def budget(self, tenant_id: str, task_id: str, windows: Sequence[Scope], now_ms: int) -> BudgetState:
        keys = TenantKeys(tenant_id)
        script_keys = [keys.leases, keys.task(task_id)]
        args: list[Any] = [now_ms, keys.resv_prefix]
        for scope in windows:
            assert scope.span is not None
            script_keys.append(keys.window(scope.span))
            args.append(_limit_arg(scope.limit))
        reply = await self._budget(keys=script_keys, args=args)
        task_type = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        return BudgetState(bool(int(reply[0])), task_type, int(reply[2]), _counters(reply[3:]))
