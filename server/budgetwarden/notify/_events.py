"""What is sent: a stored event as a CloudEvent (structured JSON mode, CloudEvents 1.0) or as Slack text, and the
signature of a webhook body (Standard Webhooks: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from budgetwarden.store import NotificationEntry

TYPE_PREFIX = "io.budgetwarden."
SIGNATURE_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
_COUNTER = ("limit", "used", "reserved", "limit_usd_micros", "used_usd_micros", "reserved_usd_micros")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _task(text: str) -> dict[str, int | None]:
    values = [int(v) for v in text.split()]
    return {k: (None if k.startswith("limit") and v < 0 else v) for k, v in zip(_COUNTER, values, strict=True)}


def event_data(entry: NotificationEntry) -> dict[str, Any]:
    """The event's ``data``: the stored fields, typed (counters as numbers; a task's counter as an object)."""
    f = entry.fields
    data: dict[str, Any] = {"tenant_id": entry.tenant_id}
    if f["type"].startswith("checkpoint."):
        data |= {"checkpoint_id": f["checkpoint_id"], "task_id": f["task_id"], "task_type": f["task_type"]}
        data["task"] = _task(f["task"])
        if "added" in f:
            data |= {"added_tokens": int(f["added"]), "added_usd_micros": int(f["added_usd"])}
        if "by" in f:
            data["decided_by"] = f["by"]
    else:
        data |= {"window": f["window"], "unit": f["unit"], "fraction": int(f["fraction_bp"]) / 10_000}
        data |= {"limit": int(f["limit"]), "used": int(f["used"]), "reserved": int(f["reserved"])}
    return data


def event_id(entry: NotificationEntry) -> str:
    """Unique per source: the tenant and the entry's stream id. A redelivered event keeps it: receivers dedupe on it."""
    return f"{entry.tenant_id}/{entry.entry_id}"


def cloud_event(entry: NotificationEntry, source: str) -> dict[str, Any]:
    data = event_data(entry)
    subject = f"{entry.tenant_id}/{data['task_id']}" if "task_id" in data else entry.tenant_id
    return {
        "specversion": "1.0",
        "type": TYPE_PREFIX + entry.fields["type"],
        "source": source,
        "id": event_id(entry),
        "time": _iso(int(entry.fields["time"])),
        "subject": subject,
        "datacontenttype": "application/json",
        "data": data,
    }


def slack_text(entry: NotificationEntry) -> str:
    data = event_data(entry)
    kind = entry.fields["type"]
    tenant = data["tenant_id"]
    if kind == "checkpoint.opened":
        task = data["task"]
        return (
            f":raised_hand: budgetwarden: task `{data['task_id']}` of `{tenant}` stopped at a checkpoint "
            f"({task['used']} tokens used of {task['limit']}). Approve: `budgetwarden approve {data['checkpoint_id']} "
            "--add N`"
        )
    if kind == "checkpoint.approved":
        return (
            f":white_check_mark: budgetwarden: checkpoint `{data['checkpoint_id']}` of `{tenant}` approved by "
            f"{data.get('decided_by') or 'someone'} (+{data['added_tokens']} tokens)"
        )
    if kind == "checkpoint.denied":
        return (
            f":no_entry: budgetwarden: checkpoint `{data['checkpoint_id']}` of `{tenant}` denied by "
            f"{data.get('decided_by') or 'someone'}"
        )
    unit = "tokens" if data["unit"] == "tokens" else "micro-USD"
    return (
        f":warning: budgetwarden: `{tenant}` window {data['window']} reached {data['fraction']:.0%} of its {unit} "
        f"limit ({data['used'] + data['reserved']} of {data['limit']})"
    )


def read_secret(path: Path) -> bytes:
    """The signing key: the file's text, stripped; a Standard Webhooks key (``whsec_`` + base64) is decoded."""
    text = path.read_text(encoding="utf-8").strip()
    if text.startswith("whsec_"):
        return base64.b64decode(text[len("whsec_") :])
    return text.encode()


def _signature(secret: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    return base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode()


def sign(secret: bytes, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers that sign ``body``: HMAC-SHA256 over ``id.timestamp.body`` (timestamp in Unix seconds)."""
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": "v1," + _signature(secret, message_id, timestamp, body),
    }


def verify(secret: bytes, headers: Mapping[str, str], body: bytes, now_s: int, tolerance_s: int = 300) -> bool:
    """What a receiver does (docs/operators.md): the signature matches and the timestamp is recent (no replay)."""
    try:
        message_id, timestamp = headers["webhook-id"], int(headers["webhook-timestamp"])
        signatures = headers["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if abs(now_s - timestamp) > tolerance_s:
        return False
    expected = _signature(secret, message_id, timestamp, body)
    return any(hmac.compare_digest(sig.partition(",")[2], expected) for sig in signatures if sig.startswith("v1,"))


def body_of(event: Mapping[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
