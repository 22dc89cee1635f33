"""Budget storage in Redis: every mutation is one Lua script, one round trip, atomic across all scopes of a step."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast
from urllib.parse import unquote

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from budgetwarden.domain import (
    MAX_LIMIT_TOKENS,
    MAX_LIMIT_USD,
    Amount,
    Counter,
    ReleaseStatus,
    ReportStatus,
    Scope,
    StoreStatus,
    Thresholds,
    Unit,
    UsageInput,
)
from budgetwarden.telemetry import Telemetry

from ._codec import FIELD_SEPARATOR, field_text, limit_arg, read_counters, read_thresholds, reply_text
from ._keys import GLOBAL_AUDIT_KEY, TenantKeys, checkpoint_prefix, digest, reservation_id
from ._lean import LeanScripts
from ._usage import event_id, event_payload

AnyRedis = Redis | RedisCluster


def load_lua(name: str) -> str:
    """A script's source: the shared helpers followed by the script itself."""
    lua = resources.files("budgetwarden.store.lua")
    return lua.joinpath("_lib.lua").read_text() + "\n" + lua.joinpath(f"{name}.lua").read_text()


# Usage records per report.lua call: a call holds Redis for its whole length.
REPORT_BATCH = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class Retention:
    """How long the store keeps things, in milliseconds."""

    record_ms: int = 86_400_000
    task_ms: int = 7 * 86_400_000
    idempotency_ms: int = 86_400_000
    window_grace_ms: int = 3_600_000
    usage_max_len: int = 1_000_000
    usage_max_age_ms: int = 7 * 86_400_000
    audit_max_len: int = 100_000
    audit_max_age_ms: int = 90 * 86_400_000
    # Notifications (lua/_lib.lua, notify_append): the tenant stream's cap (0: no events are written), how long an
    # undelivered event is kept, and the fractions of a window's limits (basis points) whose crossing is notified.
    notify_max_len: int = 0
    notify_max_age_ms: int = 7 * 86_400_000
    notify_fractions_bp: tuple[int, ...] = ()


@dataclass(slots=True, kw_only=True)
class Reservation:
    """What a check did in the store. A replay carries the answer stored with the reservation (``answer``, made by
    _replay; empty for a record from before answers were stored) and the figures as they are now."""

    status: StoreStatus
    fitted: int | None
    granted: Amount
    lease_expires_ms: int
    reservation_id: str
    checkpoint_id: str
    thresholds: Thresholds
    counters: tuple[Counter, ...]
    answer: str = ""

    @property
    def replayed(self) -> bool:
        return self.status is StoreStatus.REPLAYED


@dataclass(slots=True, kw_only=True)
class StepCheck:
    """One step to check: its task's scope and thresholds (used if this is the task's first check), the candidates
    (tokens, micro-USD, bound, label, answer part) in order of preference, and how long its lease is; the request's
    fingerprint and the answer's part common to every candidate, which a reservation keeps (see _replay)."""

    task_id: str
    step_id: str
    task_type: str
    task: Scope
    thresholds: Thresholds
    candidates: Sequence[tuple[int, int, int, str, str]]
    lease_ms: int
    fingerprint: str
    answer: str


_STORE_STATUS = {int(status): status for status in StoreStatus}


# Thresholds as replies hold them: a task's are fixed by its first check, so the same few pairs come back (a Thresholds
# is frozen, and shared).
_THRESHOLDS: dict[tuple[Any, Any], Thresholds] = {}


def _reservation(reply: Sequence[Any], rid: str) -> Reservation:
    status = _STORE_STATUS[int(reply[0])]
    fitted = int(reply[1])
    replayed = status is StoreStatus.REPLAYED
    detail = reply_text(reply[5])  # the stored answer of a replay, else the checkpoint id (or nothing)
    pair = (reply[6], reply[7])
    thresholds = _THRESHOLDS.get(pair)
    if thresholds is None:
        if len(_THRESHOLDS) >= 1024:
            _THRESHOLDS.clear()
        thresholds = _THRESHOLDS[pair] = read_thresholds(*pair)
    return Reservation(
        status=status,
        fitted=None if fitted < 0 else fitted,
        granted=Amount(int(reply[2]), int(reply[3])),
        lease_expires_ms=int(reply[4]),
        reservation_id=rid if replayed or status is StoreStatus.RESERVED else "",
        checkpoint_id="" if replayed else detail,
        thresholds=thresholds,
        counters=read_counters(reply, 8),
        answer=detail if replayed else "",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageEntry:
    """A usage record ready for the store: its cost (for a record naming no model: at the default model, used only
    when its reservation recorded no prices), and where to charge it if it has no reservation."""

    record: UsageInput
    cost_usd: int
    windows: Sequence[Scope]
    at_ms: int
    # The record as the caller sent it, when the limiter completed it (a fail-open id resolved to its task and step):
    # its fingerprint is of what was sent, so that a keyless report of the same step is the same record.
    as_sent: UsageInput | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Applied:
    """What a usage record did in the store."""

    status: ReportStatus
    reservation_id: str
    charged: int
    charged_usd: int
    refunded: int
    overage: int
    task: Counter | None
    task_type: str = ""
    # The reservation's lease had lapsed before the record came: its budget was free for other steps meanwhile.
    late: bool = False
    # The model the record was priced at when it named none and its reservation recorded one (else None).
    reservation_model: str | None = None
    # Filled by the limiter: the model the record was priced at, and whether its prices were the policy's default.
    model: str = ""
    model_assumed: bool = False


class IdempotencyConflictError(Exception):
    """A record reused the idempotency marker of a different record (its key, or for a keyless record its step's
    derived one). Nothing of the script call holding it was applied; ``partial`` says the request spanned other calls,
    which were applied independently."""

    def __init__(self, index: int, keyless: bool, partial: bool) -> None:
        self.index = index
        self.keyless = keyless
        self.partial = partial
        what = "its step was already reported" if keyless else "its idempotency key was already used"
        super().__init__(f"record {index}: {what} with a different record")


_CONFLICT = re.compile(r"BWCONFLICT (\d+)")


def record_fingerprint(record: UsageInput, rid: str) -> str:
    """What makes two records "the same record" for an idempotency key: where they charge and what they report. Not
    the timestamp: a client that resends a record may stamp it again."""
    labels = json.dumps(sorted(record.labels.items()))
    return digest(
        record.tenant_id,
        rid,
        record.task_type,
        record.model,
        str(record.input_tokens),
        str(record.cached_input_tokens),
        str(record.output_tokens),
        str(record.tool_calls),
        str(int(record.outcome)),
        labels,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetState:
    task_known: bool
    task_type: str
    active_reservations: int
    checkpoint_id: str
    checkpoint_at_ms: int
    closed: bool
    thresholds: Thresholds
    counters: tuple[Counter, ...]


def unconfirmed_script_shas() -> frozenset[str]:
    """Scripts that a ``--durability`` confirmation need not wait for: GetBudget's only write is the sweep of lapsed
    leases, which nobody is told about and which the next call does again if a failover loses it. So budgets can be
    read while writes wait for a replica."""
    return frozenset({hashlib.sha1(load_lua("budget").encode()).hexdigest()})  # the script id, as Redis


def _packs_alike(packed: StepCheck, step: StepCheck) -> bool:
    """Whether ``step``'s argument, its ids aside, is ``packed``'s: the same objects (or lease) in every other field."""
    return (
        step.candidates is packed.candidates
        and step.lease_ms == packed.lease_ms
        and step.task is packed.task
        and step.thresholds is packed.thresholds
        and step.task_type is packed.task_type
        and step.fingerprint is packed.fingerprint
        and step.answer is packed.answer
    )


def _step_parts(step: StepCheck, now_ms: int) -> tuple[str, str, str]:
    """check.lua's argument for one step, but for its task id, step id and checkpoint prefix: the fields that go before
    the task id, between it and the step id, and after the checkpoint prefix, each with its separators. The fields are
    the lease's expiry, the task's ceilings and thresholds, the task id, the task type, the step id, the checkpoint
    prefix, the fingerprint, the answer's common part, then five per candidate."""
    task, thresholds = step.task, step.thresholds
    before = [
        str(now_ms + step.lease_ms),
        str(limit_arg(task.limit)),
        str(limit_arg(task.limit_usd)),
        str(limit_arg(thresholds.soft_bp)),
        str(limit_arg(thresholds.checkpoint_bp)),
        "",
    ]
    after = ["", step.fingerprint, step.answer]
    for tokens, usd, bound, label, answer in step.candidates:
        after += (str(tokens), str(usd), str(bound), field_text(label), answer)
    separator = FIELD_SEPARATOR
    return separator.join(before), f"{separator}{field_text(step.task_type)}{separator}", separator.join(after)


class BudgetStore:
    """The Redis side. Scripts are redis-py ``Script`` objects: EVALSHA, with a fallback to EVAL on NOSCRIPT."""

    def __init__(
        self,
        redis: AnyRedis,
        retention: Retention | None = None,
        telemetry: Telemetry | None = None,
        *,
        lean: LeanScripts | None = None,
    ) -> None:
        self.redis = redis
        # When set, check.lua's calls go through it (store/_lean.py) instead of redis-py; everything else does not.
        self.lean = lean
        self.retention = retention or Retention()
        self.telemetry = telemetry or Telemetry(None)
        self._check = self._script("check")
        self._report = self._script("report")
        self._release = self._script("release")
        self._budget = self._script("budget")
        self._admin = self._script("admin")
        self._checkpoints = self._script("checkpoints")
        self._audit = self._script("audit")

    def _script(self, name: str) -> AsyncScript:
        return self.redis.register_script(load_lua(name))

    def _window_config(self, windows: Sequence[Scope]) -> str:
        """check.lua's ARGV[5]: the number of windows, then what to notify (when notifications are on)."""
        retention = self.retention
        if retention.notify_max_len <= 0:
            return str(len(windows))
        parts = [len(windows), retention.notify_max_len, retention.notify_max_age_ms, *retention.notify_fractions_bp]
        return " ".join(str(part) for part in parts)

    async def reserve_many(
        self, tenant_id: str, windows: Sequence[Scope], steps: Sequence[StepCheck], now_ms: int
    ) -> list[Reservation]:
        """Check many steps of one tenant in one script call, in order; each is all-or-nothing on its own and decided
        as if it ran alone after the ones before it (lua/check.lua)."""
        script_keys, args, ids = self.check_call(tenant_id, windows, steps, now_ms)
        started = time.perf_counter()
        if self.lean is not None:
            replies = await self.lean.run(self._check, script_keys, args)
        else:
            replies = await self._check(keys=script_keys, args=args)
        self.telemetry.redis_call("check", time.perf_counter() - started)
        return [_reservation(reply, rid) for reply, rid in zip(replies, ids, strict=True)]

    def check_call(
        self, tenant_id: str, windows: Sequence[Scope], steps: Sequence[StepCheck], now_ms: int
    ) -> tuple[list[str], list[Any], list[str]]:
        """check.lua's keys and arguments for ``reserve_many``, and the steps' reservation ids."""
        keys = TenantKeys(tenant_id)
        retention = self.retention
        script_keys = [keys.leases]
        args: list[Any] = [
            now_ms,
            retention.record_ms,
            keys.resv_prefix,
            retention.task_ms,
            self._window_config(windows),
        ]
        for scope in windows:
            assert scope.span is not None
            script_keys.append(keys.window(scope.span))
            alive_until = scope.span.end_ms + retention.window_grace_ms
            args += (limit_arg(scope.limit), limit_arg(scope.limit_usd), alive_until)
        ids = []
        # A step's argument: its ids between parts that steps of one kind share (the limiter hands such steps the same
        # objects), packed once per kind: (the step they were packed from, what goes before the task id, between it
        # and the step id, after the checkpoint prefix).
        packed: dict[int, tuple[StepCheck, str, str, str]] = {}
        for step in steps:
            task_id, step_id = step.task_id, step.step_id
            rid = reservation_id(task_id, step_id)
            ids.append(rid)
            script_keys += (keys.reservation(rid), keys.task(task_id))
            known = packed.get(id(step.candidates))
            if known is None or not _packs_alike(known[0], step):
                known = packed[id(step.candidates)] = (step, *_step_parts(step, now_ms))
            prefix = checkpoint_prefix(tenant_id, task_id)
            args.append(f"{known[1]}{task_id}{known[2]}{step_id}{FIELD_SEPARATOR}{prefix}{known[3]}")
        return script_keys, args, ids

    async def report(self, entries: Sequence[UsageEntry], now_ms: int) -> list[Applied]:
        """Apply usage records in script calls of up to REPORT_BATCH records of one tenant, all in one round trip on a
        single node; each record is atomic on its own and applied as if it ran alone after the ones before it
        (lua/report.lua)."""
        if not entries:
            return []
        rids = [entry.record.reservation_id or reservation_id(entry.record.task_id, entry.record.step_id)
                for entry in entries]  # fmt: skip
        by_tenant: dict[str, list[int]] = {}
        for i, entry in enumerate(entries):
            by_tenant.setdefault(entry.record.tenant_id, []).append(i)
        # One group of calls per tenant, in order: a retry later in the same report stays the duplicate.
        groups: list[list[tuple[list[str], list[Any]]]] = []
        placed: list[list[int]] = []
        for tenant_id, indexes in by_tenant.items():
            calls = []
            for start in range(0, len(indexes), REPORT_BATCH):
                chunk = indexes[start : start + REPORT_BATCH]
                calls.append(self._report_call(tenant_id, [(entries[i], rids[i]) for i in chunk], now_ms))
                placed.append(chunk)
            groups.append(calls)
        started = time.perf_counter()
        replies = [reply for group in await self._run_in_order(self._report, groups) for reply in group]
        self.telemetry.redis_call("report", time.perf_counter() - started)
        for chunk, chunk_replies in zip(placed, replies, strict=True):
            if isinstance(chunk_replies, Exception):
                conflict = _CONFLICT.search(str(chunk_replies))
                if conflict is None:
                    raise chunk_replies
                index = chunk[int(conflict.group(1))]
                keyless = not entries[index].record.idempotency_key
                raise IdempotencyConflictError(index, keyless, partial=len(placed) > 1)
        applied: list[Applied | None] = [None] * len(entries)
        for chunk, chunk_replies in zip(placed, replies, strict=True):
            for i, reply in zip(chunk, chunk_replies, strict=True):
                status, charged, charged_usd, refunded, overage, known = (int(v) for v in reply[:6])
                task = read_counters(reply[6:12])[0] if known else None
                late, priced = int(reply[13]), int(reply[14])
                applied[i] = Applied(
                    status=ReportStatus(status),
                    reservation_id=rids[i],
                    charged=charged,
                    charged_usd=charged_usd,
                    refunded=refunded,
                    overage=overage,
                    task=task,
                    task_type=reply_text(reply[12]),
                    late=bool(late),
                    reservation_model=unquote(reply_text(reply[15])) if priced else None,
                )
        return applied  # type: ignore[return-value]

    def _report_call(
        self, tenant_id: str, entries: Sequence[tuple[UsageEntry, str]], now_ms: int
    ) -> tuple[list[str], list[Any]]:
        """Keys and arguments of one report.lua call for records of one tenant, each with its reservation id."""
        keys = TenantKeys(tenant_id)
        retention = self.retention
        window_position: dict[str, int] = {}
        window_keys: list[str] = []
        window_untils: list[int] = []
        record_keys: list[str] = []
        record_args: list[str] = []
        for entry, rid in entries:
            record = entry.record
            resv_key = keys.reservation(rid)
            # Without a key, report.lua completes the marker with the reservation's generation.
            marker = keys.idempotency(record.idempotency_key) if record.idempotency_key else keys.keyless_marker(rid)
            record_keys += (resv_key, marker, keys.task(record.task_id) if record.task_id else resv_key)
            positions = []
            for scope in entry.windows:
                assert scope.span is not None
                key = keys.window(scope.span)
                if key not in window_position:
                    window_keys.append(key)
                    window_untils.append(scope.span.end_ms + retention.window_grace_ms)
                    window_position[key] = len(window_keys)
                positions.append(str(window_position[key]))
            record_args.append(
                FIELD_SEPARATOR.join(
                    (
                        str(record.tokens),
                        str(entry.cost_usd),
                        "1" if record.task_id else "0",
                        "0" if record.idempotency_key else "1",
                        record.task_id,
                        field_text(record.task_type),
                        event_id(record.tenant_id, record.idempotency_key),
                        " ".join(positions),
                        event_payload(record, rid, entry.cost_usd, entry.at_ms),
                        record_fingerprint(entry.as_sent or record, rid),
                        "1" if record.model else "0",
                        str(record.input_tokens - record.cached_input_tokens),
                        str(record.cached_input_tokens),
                        str(record.output_tokens),
                    )
                )
            )
        args: list[Any] = [
            now_ms,
            retention.idempotency_ms,
            keys.resv_prefix,
            retention.task_ms,
            retention.usage_max_len,
            max(0, now_ms - retention.usage_max_age_ms),
            len(window_keys),
            *window_untils,
            *record_args,
        ]
        return [keys.leases, keys.usage, *window_keys, *record_keys], args

    async def _run_in_order(
        self, script: AsyncScript, groups: Sequence[Sequence[tuple[list[str], list[Any]]]]
    ) -> list[list[Any]]:
        """Run groups of script calls, each group's calls in order: all in one pipeline on a single node (a pipeline
        keeps its order); on a cluster, where redis-py does not pipeline EVALSHA, the groups concurrently and each
        group's calls one after another (each call goes straight to the node owning its tenant's slot). A call the
        script refused (an error reply) gives its ResponseError as its reply; the other calls still run."""
        if isinstance(self.redis, RedisCluster):

            async def one(keys: list[str], args: list[Any]) -> Any:
                try:
                    return await script(keys=keys, args=args)
                except ResponseError as exc:
                    return exc

            async def in_order(calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
                return [await one(keys, args) for keys, args in calls]

            return list(await asyncio.gather(*(in_order(calls) for calls in groups)))
        pipe = self.redis.pipeline(transaction=False)
        for calls in groups:
            for keys, args in calls:
                await script(keys=keys, args=args, client=cast(Redis, pipe))
        replies = iter(await pipe.execute(raise_on_error=False))
        return [[next(replies) for _ in calls] for calls in groups]

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
            args += (limit_arg(scope.limit), limit_arg(scope.limit_usd))
        reply = await self._budget(keys=script_keys, args=args)
        return BudgetState(
            task_known=bool(int(reply[0])),
            task_type=reply_text(reply[1]),
            active_reservations=int(reply[2]),
            checkpoint_id=reply_text(reply[3]),
            checkpoint_at_ms=int(reply[4]),
            closed=bool(int(reply[5])),
            thresholds=read_thresholds(reply[6], reply[7]),
            counters=read_counters(reply[8:]),
        )

    def _audit_args(self, audit: str) -> list[str | int]:
        """admin.lua's last arguments: the caller's audit entry ('' for none), the stream's bounds and the notification
        stream's."""
        retention = self.retention
        return [audit, retention.audit_max_len, retention.audit_max_age_ms, retention.notify_max_len,
                retention.notify_max_age_ms]  # fmt: skip

    async def decide_checkpoint(
        self,
        tenant_id: str,
        task_id: str,
        checkpoint: str,
        *,
        approve: bool,
        add: Amount,
        now_ms: int,
        audit: str = "",
    ) -> tuple[int, Counter]:
        """Approve (adding ``add`` to the task's ceilings) or deny a checkpoint. Raises CeilingRefusedError, with
        nothing written, when the addition would take a ceiling past the highest allowed. ``audit``: the caller's
        audit entry, appended to the tenant's audit stream with the outcome in the same script."""
        keys = TenantKeys(tenant_id)
        action = "approve" if approve else "deny"
        args: list[str | int] = [action, now_ms, self.retention.task_ms, checkpoint, add.tokens, add.usd]
        args += [MAX_LIMIT_TOKENS, MAX_LIMIT_USD, "", *self._audit_args(audit)]
        reply = await self._admin(keys=[keys.task(task_id), keys.audit], args=args)
        outcome, counter = int(reply[0]), read_counters(reply[1:7])[0]
        _refuse_ceiling(outcome, reply[7:], counter, add)
        return outcome, counter

    async def set_ceiling(
        self,
        tenant_id: str,
        task_id: str,
        *,
        add: bool,
        tokens: int | None,
        usd: int | None,
        now_ms: int,
        request_id: str = "",
        audit: str = "",
    ) -> CeilingChange:
        """Set or add to a task's ceilings, atomically; an add needs a ceiling to add to (the task's first check fixes
        it) and never passes the highest allowed. With ``request_id``, a change is applied once however often it is
        sent. Raises CeilingRefusedError or RequestIdReusedError, with nothing written."""
        keys = TenantKeys(tenant_id)
        args: list[str | int] = ["ceiling", now_ms, self.retention.task_ms, "add" if add else "set"]
        args += ["" if tokens is None else tokens, "" if usd is None else usd, MAX_LIMIT_TOKENS, MAX_LIMIT_USD]
        args += [request_id, *self._audit_args(audit)]
        reply = await self._admin(keys=[keys.task(task_id), keys.audit], args=args)
        outcome, counter = int(reply[0]), read_counters(reply[1:7])[0]
        if outcome == _REQUEST_REUSED:
            raise RequestIdReusedError(request_id)
        _refuse_ceiling(outcome, reply[7:], counter, Amount(tokens or 0, usd or 0))
        return CeilingChange(counter, replayed=outcome == _CEILING_REPLAYED)

    async def reset_task(self, tenant_id: str, task_id: str, *, now_ms: int = 0, audit: str = "") -> bool:
        """Forget a task (its open checkpoint leaves the index with it); True when there was one."""
        keys = TenantKeys(tenant_id)
        args: list[str | int] = ["reset", now_ms, self.retention.task_ms, "", "", "", "", "", ""]
        args += self._audit_args(audit)
        reply = await self._admin(keys=[keys.task(task_id), keys.audit], args=args)
        return int(reply[0]) == _TASK_RESET

    async def list_checkpoints(
        self, tenant_id: str, *, decided: bool, page_size: int, after: CheckpointCursor | None, scan_limit: int
    ) -> CheckpointPage:
        """A page of the tenant's open checkpoints (oldest first) or decided ones (latest first), after ``after``
        (lua/checkpoints.lua). Looks at ``scan_limit`` index members at most, so a page may come short."""
        keys = TenantKeys(tenant_id)
        index = keys.checkpoints_decided if decided else keys.checkpoints_open
        cursor = after or CheckpointCursor("", "")
        args = ["decided" if decided else "open", page_size, cursor.score, cursor.checkpoint_id, scan_limit]
        reply = await self._checkpoints(keys=[index], args=args)
        items = []
        for at in range(3, len(reply), 15):
            row = reply[at : at + 15]
            items.append(
                CheckpointRecord(
                    checkpoint_id=reply_text(row[0]),
                    tenant_id=tenant_id,
                    task_id=reply_text(row[1]),
                    task_type=reply_text(row[2]),
                    state=reply_text(row[3]),
                    opened_at_ms=int(row[4]),
                    decided_at_ms=int(row[5]),
                    added=Amount(int(row[6]), int(row[7])),
                    task=read_counters(row[9:15])[0] if int(row[8]) else None,
                )
            )
        more = bool(int(reply[0]))
        last = CheckpointCursor(reply_text(reply[1]), reply_text(reply[2]))
        return CheckpointPage(items, last if more else None)

    async def append_audit(self, tenant_id: str | None, fields: Mapping[str, str]) -> None:
        """Append an entry (a refused call) to the tenant's audit stream, or the global one without a tenant."""
        stream = GLOBAL_AUDIT_KEY if tenant_id is None else TenantKeys(tenant_id).audit
        max_len, max_age_ms = self.retention.audit_max_len, self.retention.audit_max_age_ms
        flat = [value for pair in fields.items() for value in pair]
        await self._audit(keys=[stream], args=[max_len, max_age_ms, *flat])


@dataclass(frozen=True, slots=True)
class CheckpointCursor:
    """Where a page of checkpoints ended: the index score (opened or decided at, ms, as text) and id of its last."""

    score: str
    checkpoint_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointRecord:
    checkpoint_id: str
    tenant_id: str
    task_id: str
    task_type: str
    state: str  # open, approved or denied
    opened_at_ms: int
    decided_at_ms: int  # 0 while open
    added: Amount
    task: Counter | None  # None when the task is no longer stored


@dataclass(frozen=True, slots=True)
class CheckpointPage:
    checkpoints: list[CheckpointRecord]
    next: CheckpointCursor | None  # None on the last page


# lua/admin.lua's outcomes beyond the checkpoint ones (1 to 6, CheckpointOutcome in admin.proto).
_CEILING_REPLAYED, _REQUEST_REUSED, _NO_CEILING_YET, _ABOVE_HIGHEST, _TASK_RESET = 8, 9, 10, 11, 12
_CEILING_UNITS = {"limit": Unit.TOKENS, "limit_usd": Unit.USD}


class CeilingRefusedError(Exception):
    """A change to a task's ceiling that the task's state does not allow; nothing was written. ``unit`` names the
    ceiling (tokens or micro-USD) that refused it."""

    def __init__(self, unit: Unit, reason: str) -> None:
        super().__init__(reason)
        self.unit = unit


class RequestIdReusedError(Exception):
    """A request id already used for another change to the task's ceiling; nothing was written."""


@dataclass(frozen=True, slots=True)
class CeilingChange:
    task: Counter
    replayed: bool  # the request id was seen before: the change was made then, not again


def _refuse_ceiling(outcome: int, field: Sequence[Any], counter: Counter, amount: Amount) -> None:
    """Raises CeilingRefusedError for lua/admin.lua's refusals of an amount; ``field`` is the rest of its reply."""
    if outcome not in (_NO_CEILING_YET, _ABOVE_HIGHEST):
        return
    unit = _CEILING_UNITS[reply_text(field[0])]
    name = "token" if unit is Unit.TOKENS else "cost (micro-USD)"
    if outcome == _NO_CEILING_YET:
        raise CeilingRefusedError(
            unit,
            f"the task has no {name} ceiling to add to yet: its first check fixes it (from its task type); "
            "set one with CEILING_MODE_SET, or add after the first check",
        )
    current = counter.limit if unit is Unit.TOKENS else counter.limit_usd
    added = amount.tokens if unit is Unit.TOKENS else amount.usd
    highest = MAX_LIMIT_TOKENS if unit is Unit.TOKENS else MAX_LIMIT_USD
    raise CeilingRefusedError(
        unit,
        f"the task's {name} ceiling of {current} plus {added} would pass the highest allowed ({highest}); "
        "nothing was changed",
    )
