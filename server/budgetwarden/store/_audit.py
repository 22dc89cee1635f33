"""The audit trail of admin calls: entries in a Redis stream per tenant (and one for refused calls that name no
tenant), written by lua/admin.lua in the same script as the change they record, or by lua/audit.lua for a refusal.

An entry's fields: ``entry`` (JSON from the transport: when, who, which role, how they proved it, from where, which
call and what it asked), ``outcome`` (admin.lua's number, or a refusal's status code name), and for a change the
task's counter ``before`` and ``after`` (limit, used, reserved, limit_usd, used_usd, reserved_usd; limits -1: none).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import redis

from ._codec import NONE, reply_text
from ._keys import GLOBAL_AUDIT_KEY, TenantKeys

# lua/admin.lua's outcomes by number.
ADMIN_OUTCOMES = {
    1: "APPROVED",
    2: "ALREADY_APPROVED",
    3: "DENIED",
    4: "ALREADY_DENIED",
    5: "NOT_FOUND",
    6: "CONFLICT",
    7: "CEILING_SET",
    8: "REPLAYED",
    9: "REQUEST_ID_REUSED",
    10: "NO_CEILING_YET",
    11: "ABOVE_HIGHEST_CEILING",
    12: "RESET",
    13: "NOTHING_TO_RESET",
}
_COUNTER_FIELDS = ("limit_tokens", "used_tokens", "reserved_tokens", "limit_usd_micros", "used_usd_micros",
                   "reserved_usd_micros")  # fmt: skip


def _counter(text: str) -> dict[str, int | None]:
    values = [int(v) for v in text.split()]
    pairs = zip(_COUNTER_FIELDS, values, strict=True)
    return {name: (None if name.startswith("limit") and v == NONE else v) for name, v in pairs}


def audit_record(stream_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """One entry as exported: the transport's entry, the outcome by name, the counters before and after."""
    record: dict[str, Any] = {"stream_id": stream_id, **json.loads(fields.get("entry", "{}"))}
    outcome = fields.get("outcome", "")
    record["outcome"] = ADMIN_OUTCOMES.get(int(outcome), outcome) if outcome.isdigit() else outcome
    for name in ("before", "after"):
        if fields.get(name):
            record[name] = _counter(fields[name])
    if fields.get("field"):
        record["refused_field"] = fields["field"]
    return record


def audit_streams(client: redis.Redis, tenant_id: str | None) -> list[str]:
    if tenant_id is not None:
        return [TenantKeys(tenant_id).audit]
    found = sorted(reply_text(key) for key in client.scan_iter(match="bw1:{*}:audit", _type="STREAM"))
    return [GLOBAL_AUDIT_KEY, *found]


def read_audit(
    client: redis.Redis, tenant_id: str | None, since_ms: int, until_ms: int | None = None, batch: int = 1000
) -> Iterator[dict[str, Any]]:
    """Entries written in [since_ms, until_ms] (Redis's clock), oldest first across every stream read."""
    end = "+" if until_ms is None else str(until_ms)
    entries: list[tuple[tuple[int, int], dict[str, Any]]] = []
    for stream in audit_streams(client, tenant_id):
        start = str(since_ms)
        while True:
            page = client.xrange(stream, min=start, max=end, count=batch) or []
            for stream_id, raw in page:
                sid = reply_text(stream_id)
                fields = {reply_text(k): reply_text(v) for k, v in (raw or {}).items()}
                ms, _, seq = sid.partition("-")
                entries.append(((int(ms), int(seq or 0)), audit_record(sid, fields)))
            if len(page) < batch:
                break
            start = "(" + reply_text(page[-1][0])
    entries.sort(key=lambda pair: pair[0])
    for _, record in entries:
        yield record
