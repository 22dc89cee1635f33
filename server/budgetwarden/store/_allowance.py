"""The store side of a local allowance (lua/allowance.lua): take a slice of a task's budget, settle the steps granted
from it, hand back the rest. Thin: the rules are in lua/allowance.lua and domain/_allowance.py."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from budgetwarden.domain import Amount, Counter, Scope, Thresholds

from ._codec import FIELD_SEPARATOR, NONE, field_text, limit_arg, read_counters, read_thresholds
from ._keys import TenantKeys, digest
from ._store import BudgetStore


def slice_id(holder: str, task_id: str, number: int) -> str:
    """A slice record's id, apart from the steps' ids: per holder (a sidecar process), task and take, so that a slice
    still being settled and handed back never shares its record with the next slice of the same task."""
    return "s" + digest("slice", holder, task_id, str(number))[1:]


@dataclass(frozen=True, slots=True, kw_only=True)
class Slice:
    """What a take reserved: ``usd`` is None when no scope limits cost (grants are then counted when settled).
    ``counters`` are the task's and the windows' figures right after the take, ``thresholds`` the task's."""

    status: int  # 1 taken; 0 the task has had no check yet; 2 closed, at a checkpoint, or too little left
    tokens: int
    usd: int | None
    lease_until_ms: int
    thresholds: Thresholds
    counters: tuple[Counter, ...]

    @property
    def taken(self) -> bool:
        return self.status == 1


@dataclass(frozen=True, slots=True, kw_only=True)
class SettledStep:
    """A step granted from a slice, as settled: recorded as its own reservation, or not (see SettleStatus)."""

    step_id: str
    reservation_id: str  # keys.reservation_id(task, step): where its reservation is recorded
    lease_until_ms: int
    amount: Amount
    fingerprint: str
    answer: str
    label: str


class SettleStatus(enum.IntEnum):
    RECORDED = 1
    REPLAYED = 2  # the step held a reservation with the same fingerprint: the grant's tokens went back to the slice
    LAPSED = 3  # the slice had lapsed: recorded as lapsed (a report of the step is late)
    REPORTED = 4  # reported (without a key) through another sidecar before it was settled: nothing reserved for it
    CONFLICT = 5  # the step held a reservation made for another request: the grant's tokens went back


@dataclass(frozen=True, slots=True, kw_only=True)
class Settled:
    live: bool  # the slice was still held (it is handed back now when asked)
    handed_back: int
    steps: tuple[SettleStatus, ...]


class AllowanceStore:
    """lua/allowance.lua over a BudgetStore's connection and retention."""

    def __init__(self, store: BudgetStore) -> None:
        self.store = store
        self._script = store._script("allowance")

    async def take(
        self,
        tenant_id: str,
        task_id: str,
        slice_ref: str,
        windows: Sequence[Scope],
        *,
        cap_tokens: int,
        cap_usd: int | None,
        share_bp: int,
        wanted: Amount,
        lease_until_ms: int,
        now_ms: int,
    ) -> Slice:
        """Reserve a slice of the task's budget as the record ``slice_ref`` (a slice_id)."""
        keys = TenantKeys(tenant_id)
        script_keys = [keys.leases, keys.reservation(slice_ref), keys.task(task_id)]
        args: list[Any] = ["take", now_ms, keys.resv_prefix, self.store.retention.record_ms, lease_until_ms]
        args += [cap_tokens, limit_arg(cap_usd), share_bp, wanted.tokens, wanted.usd]
        for scope in windows:
            assert scope.span is not None
            script_keys.append(keys.window(scope.span))
            alive_until = scope.span.end_ms + self.store.retention.window_grace_ms
            args += (limit_arg(scope.limit), limit_arg(scope.limit_usd), alive_until)
        reply = await self._script(keys=script_keys, args=args)
        usd = int(reply[2])
        return Slice(
            status=int(reply[0]),
            tokens=int(reply[1]),
            usd=None if usd == NONE else usd,
            lease_until_ms=int(reply[3]),
            thresholds=read_thresholds(reply[4], reply[5]),
            counters=read_counters(reply[6:]),
        )

    async def settle(
        self,
        tenant_id: str,
        task_id: str,
        slice_ref: str,
        steps: Sequence[SettledStep],
        *,
        give_back: bool,
        lease_until_ms: int,
        now_ms: int,
    ) -> Settled:
        """Record the steps granted from the slice as reservations of their own, then hand back the rest
        (``give_back``) or keep the slice until ``lease_until_ms``."""
        keys = TenantKeys(tenant_id)
        script_keys = [keys.leases, keys.reservation(slice_ref), keys.task(task_id)]
        args: list[Any] = ["settle", now_ms, keys.resv_prefix, self.store.retention.record_ms, lease_until_ms]
        args.append(1 if give_back else 0)
        for step in steps:
            script_keys += (keys.reservation(step.reservation_id), keys.keyless_marker(step.reservation_id))
            parts = (
                str(step.lease_until_ms),
                step.step_id,
                str(step.amount.tokens),
                str(step.amount.usd),
                step.fingerprint,
                step.answer,
                field_text(step.label),
            )
            args.append(FIELD_SEPARATOR.join(parts))
        reply = await self._script(keys=script_keys, args=args)
        return Settled(
            live=int(reply[0]) == 1,
            handed_back=int(reply[1]),
            steps=tuple(SettleStatus(int(status)) for status in reply[2:]),
        )
