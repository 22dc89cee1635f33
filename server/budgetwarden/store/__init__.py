"""All that knows Redis: key names and ids, the budget store (one Lua script per mutation), the usage stream, replay
of stored answers, and the embedded Valkey server. Imports the domain and telemetry only."""

from ._allowance import AllowanceStore, Settled, SettledStep, SettleStatus, Slice, slice_id
from ._audit import audit_record, read_audit
from ._cancel import raise_if_cancelled
from ._embedded import HASH_MAX_LISTPACK_VALUE, EmbeddedRedis
from ._gauges import GaugeReader
from ._keys import (
    TenantKeys,
    checkpoint_id,
    fail_open_id,
    is_reservation_id,
    parse_checkpoint_id,
    parse_fail_open_id,
    reservation_id,
)
from ._lean import LeanScripts, lean_scripts_for
from ._live import LiveTask, live_tasks
from ._notify import NotificationEntry, NotificationQueue
from ._replay import candidate_part, common_part, fingerprint, replayed_answer
from ._sentinel import (
    SentinelTarget,
    SentinelUrlError,
    async_sentinel_master,
    close_sentinels,
    is_sentinel_url,
    parse_sentinel_url,
    sync_sentinel_master,
)
from ._store import (
    AnyRedis,
    Applied,
    BudgetState,
    BudgetStore,
    CeilingChange,
    CeilingRefusedError,
    CheckpointCursor,
    CheckpointPage,
    CheckpointRecord,
    IdempotencyConflictError,
    RequestIdReusedError,
    Reservation,
    Retention,
    StepCheck,
    UsageEntry,
    unconfirmed_script_shas,
)
from ._usage import read_events

__all__ = [
    "HASH_MAX_LISTPACK_VALUE",
    "AllowanceStore",
    "AnyRedis",
    "Applied",
    "BudgetState",
    "BudgetStore",
    "CeilingChange",
    "CeilingRefusedError",
    "CheckpointCursor",
    "CheckpointPage",
    "CheckpointRecord",
    "EmbeddedRedis",
    "GaugeReader",
    "IdempotencyConflictError",
    "LeanScripts",
    "LiveTask",
    "NotificationEntry",
    "NotificationQueue",
    "RequestIdReusedError",
    "Reservation",
    "Retention",
    "SentinelTarget",
    "SentinelUrlError",
    "SettleStatus",
    "Settled",
    "SettledStep",
    "Slice",
    "StepCheck",
    "TenantKeys",
    "UsageEntry",
    "async_sentinel_master",
    "audit_record",
    "candidate_part",
    "checkpoint_id",
    "close_sentinels",
    "common_part",
    "fail_open_id",
    "fingerprint",
    "is_reservation_id",
    "is_sentinel_url",
    "lean_scripts_for",
    "live_tasks",
    "parse_checkpoint_id",
    "parse_fail_open_id",
    "parse_sentinel_url",
    "raise_if_cancelled",
    "read_audit",
    "read_events",
    "replayed_answer",
    "reservation_id",
    "slice_id",
    "sync_sentinel_master",
    "unconfirmed_script_shas",
]
