"""Redis key names. Every key of a tenant carries the tenant's hash tag; caller ids are escaped or hashed."""

from __future__ import annotations

import base64
import functools
import hashlib
import string
from dataclasses import dataclass
from urllib.parse import quote

from budgetwarden.domain import WindowSpan

KEY_VERSION = "bw1"


def digest(*parts: str) -> str:
    """A 128-bit hex digest of the parts, length-prefixed so that ("ab", "c") and ("a", "bc") differ."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        data = part.encode()
        h.update(len(data).to_bytes(4, "big"))
        h.update(data)
    return h.hexdigest()


@functools.lru_cache(maxsize=8192)
def task_digest(task_id: str) -> str:
    """A task's digest, remembered (8,192 tasks, about 1 MB): the same tasks are checked step after step."""
    return digest(task_id)


def reservation_id(task_id: str, step_id: str) -> str:
    """Stable per (task, step): checking a step again finds the same reservation."""
    return digest(task_id, step_id)


def is_reservation_id(value: str) -> bool:
    """A reservation id this service issues: a stored reservation's, or a fail-open one."""
    return _is_stored_id(value) or parse_fail_open_id(value) is not None


def _is_stored_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


FAIL_OPEN_PREFIX = "fo1."


@dataclass(frozen=True, slots=True, kw_only=True)
class FailOpenGrant:
    """What a fail-open answer granted, carried in its reservation id: nothing was stored behind it, so the report of
    the step needs the id to say where it belongs."""

    task_id: str
    step_id: str
    model: str
    task_type: str

    @property
    def reservation_id(self) -> str:
        """The step's stored reservation id: where a check of the step reserves once the store is back."""
        return reservation_id(self.task_id, self.step_id)


def fail_open_id(task_id: str, step_id: str, model: str, task_type: str) -> str:
    """Self-describing and url-safe: fo1.<task>.<step>.<model>.<task type>, each url-safe base64 without padding."""
    return FAIL_OPEN_PREFIX + ".".join(_b64(part) for part in (task_id, step_id, model, task_type))


def parse_fail_open_id(value: str) -> FailOpenGrant | None:
    """The grant a fail-open reservation id stands for, or None when it is not one."""
    if not value.startswith(FAIL_OPEN_PREFIX):
        return None
    parts = value[len(FAIL_OPEN_PREFIX) :].split(".")
    if len(parts) != 4:
        return None
    try:
        task_id, step_id, model, task_type = (_unb64_strict(part) for part in parts)
    except (ValueError, UnicodeDecodeError):
        return None
    if not (task_id and step_id):
        return None
    return FailOpenGrant(task_id=task_id, step_id=step_id, model=model, task_type=task_type)


def stored_reservation_id(value: str) -> str:
    """The id of the stored reservation an id names: a fail-open id names its step's (never spliced into a key)."""
    grant = parse_fail_open_id(value)
    return value if grant is None else grant.reservation_id


_B64_ALPHABET = frozenset(string.ascii_letters + string.digits + "-_")


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _unb64(text: str) -> str:
    """Lenient, as base64 decoding is: characters outside the alphabet are dropped."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


def _unb64_strict(text: str) -> str:
    if not all(c in _B64_ALPHABET for c in text):
        raise ValueError("not url-safe base64")
    return _unb64(text)


CHECKPOINT_PREFIX = "ck1"


def checkpoint_id(tenant_id: str, task_id: str, number: int) -> str:
    """Stable and self-describing, so that an approval needs nothing but the id: ck1.<tenant>.<task>.<n>, each part
    url-safe base64 without padding. lua/check.lua issues them, from ``checkpoint_prefix``."""
    return f"{checkpoint_prefix(tenant_id, task_id)}{number}"


@functools.lru_cache(maxsize=8192)
def checkpoint_prefix(tenant_id: str, task_id: str) -> str:
    return f"{CHECKPOINT_PREFIX}.{_b64(tenant_id)}.{_b64(task_id)}."


def parse_checkpoint_id(value: str) -> tuple[str, str] | None:
    """The (tenant, task) a checkpoint id belongs to, or None when it is not one."""
    parts = value.split(".")
    if len(parts) != 4 or parts[0] != CHECKPOINT_PREFIX or not parts[3].isdigit():
        return None
    try:
        return _unb64(parts[1]), _unb64(parts[2])
    except (ValueError, UnicodeDecodeError):
        return None


# Audit entries of refused calls that name no tenant (no credentials, or a malformed tenant id).
GLOBAL_AUDIT_KEY = f"{KEY_VERSION}:audit"


class TenantKeys:
    """The key names of one tenant. ``quote`` leaves no ``{``, ``}``, ``:`` or space in the tag."""

    __slots__ = ("audit", "checkpoints_decided", "checkpoints_open", "leases", "prefix", "resv_prefix", "usage")

    def __init__(self, tenant_id: str) -> None:
        self.prefix = f"{KEY_VERSION}:{{{quote(tenant_id, safe='')}}}:"
        self.resv_prefix = self.prefix + "resv:"
        self.leases = self.prefix + "leases"
        self.usage = self.prefix + "usage"
        # The checkpoint index (lua/_lib.lua) and the audit trail of admin calls about the tenant.
        self.checkpoints_open = self.prefix + "ckpt:open"
        self.checkpoints_decided = self.prefix + "ckpt:decided"
        self.audit = self.prefix + "audit"

    def task(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_digest(task_id)}"

    def reservation(self, reservation_id: str) -> str:
        if reservation_id.startswith(FAIL_OPEN_PREFIX):
            reservation_id = stored_reservation_id(reservation_id)
        return self.resv_prefix + reservation_id

    def window(self, span: WindowSpan) -> str:
        return f"{self.prefix}win:{span.window.name.lower()}:{span.label}"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}idem:{digest(key)}"

    def keyless_marker(self, reservation_id: str) -> str:
        """The base of the marker of a report without a key; the script appends the reservation's generation."""
        return f"{self.prefix}idem:resv:{reservation_id}"
