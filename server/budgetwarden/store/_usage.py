"""Billing-grade usage events: written by lua/report.lua to a per-tenant Redis Stream, exported as CloudEvents 1.0.

Each applied usage record becomes one stream entry (in the same atomic script that charges the counters) with a
stable event id derived from the record's idempotency key, so a receiver can dedupe across exports.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import redis

from budgetwarden.domain import UsageInput

from ._codec import reply_text
from ._keys import TenantKeys, digest

EVENT_TYPE = "io.budgetwarden.usage.v1"
SPEC_VERSION = "1.0"


def event_id(tenant_id: str, idempotency_key: str) -> str:
    """Stable across retries and exports; empty for a keyless record (the script derives one per reservation)."""
    return digest(tenant_id, idempotency_key) if idempotency_key else ""


def event_payload(record: UsageInput, reservation_id: str, cost_usd_micros: int, at_ms: int) -> str:
    """The part of the event the sidecar knows; the script adds status, admitting decision and task type."""
    return json.dumps(
        {
            "tenant_id": record.tenant_id,
            "task_id": record.task_id,
            "step_id": record.step_id,
            "reservation_id": reservation_id,
            "model": record.model,
            "input_tokens": record.input_tokens,
            "cached_input_tokens": record.cached_input_tokens,
            "output_tokens": record.output_tokens,
            "tool_calls": record.tool_calls,
            "cost_usd_micros": cost_usd_micros,
            "labels": record.labels,
            "time_ms": at_ms,
            "outcome": record.outcome.name.lower(),
            "idempotency_key": record.idempotency_key,
        },
        separators=(",", ":"),
        sort_keys=True,
    )


@dataclass(frozen=True, slots=True)
class UsageEvent:
    id: str
    stream_id: str
    data: dict[str, Any]

    def cloudevent(self) -> dict[str, Any]:
        """CloudEvents 1.0, structured JSON: required specversion/id/source/type, plus subject, time, data."""
        data = self.data
        time = datetime.fromtimestamp(data["time_ms"] / 1000, UTC).isoformat(timespec="milliseconds")
        return {
            "specversion": SPEC_VERSION,
            "id": self.id,
            "source": f"/budgetwarden/tenants/{data['tenant_id']}",
            "type": EVENT_TYPE,
            "subject": data["task_id"] or data["reservation_id"],
            "time": time.replace("+00:00", "Z"),
            "datacontenttype": "application/json",
            "data": data,
        }


def usage_streams(client: redis.Redis, tenant_id: str | None) -> list[str]:
    if tenant_id is not None:
        return [TenantKeys(tenant_id).usage]
    return sorted(reply_text(key) for key in client.scan_iter(match="bw1:{*}:usage", _type="STREAM"))


def read_events(
    client: redis.Redis, tenant_id: str | None, since_ms: int, until_ms: int | None = None, batch: int = 1000
) -> Iterator[UsageEvent]:
    """Events whose stream entry was written in [since_ms, until_ms], oldest first per tenant."""
    end = "+" if until_ms is None else str(until_ms)
    for stream in usage_streams(client, tenant_id):
        start = str(since_ms)
        while True:
            entries = client.xrange(stream, min=start, max=end, count=batch) or []
            for stream_id, fields in entries:
                values = {reply_text(k): reply_text(v) for k, v in (fields or {}).items()}
                data = json.loads(values["event"])
                data |= {
                    "status": values["status"],
                    "admitted_by": values["admitted"],
                    "task_type": values["task_type"],
                }
                # A record naming no model was priced in the script at its reservation's model.
                if "cost_usd_micros" in values:
                    data["model"] = unquote(values["model"])
                    data["cost_usd_micros"] = int(values["cost_usd_micros"])
                yield UsageEvent(values["id"], reply_text(stream_id), data)
            if len(entries) < batch:
                break
            start = "(" + reply_text(entries[-1][0])
