"""Redis key names. Every key of a tenant carries the tenant's hash tag; caller ids are escaped or hashed."""

from __future__ import annotations

import functools
import hashlib
from urllib.parse import quote

from budgetwarden._model import WindowSpan

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
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


class TenantKeys:
    """The key names of one tenant. ``quote`` leaves no ``{``, ``}``, ``:`` or space in the tag."""

    __slots__ = ("leases", "prefix", "resv_prefix", "usage")

    def __init__(self, tenant_id: str) -> None:
        self.prefix = f"{KEY_VERSION}:{{{quote(tenant_id, safe='')}}}:"
        self.resv_prefix = self.prefix + "resv:"
        self.leases = self.prefix + "leases"
        self.usage = self.prefix + "usage"

    def task(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_digest(task_id)}"

    def reservation(self, reservation_id: str) -> str:
        return self.resv_prefix + reservation_id

    def window(self, span: WindowSpan) -> str:
        return f"{self.prefix}win:{span.window.name.lower()}:{span.label}"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}idem:{digest(key)}"

    def keyless_marker(self, reservation_id: str) -> str:
        """The base of the marker of a report without a key; the script appends the reservation's generation."""
        return f"{self.prefix}idem:resv:{reservation_id}"
