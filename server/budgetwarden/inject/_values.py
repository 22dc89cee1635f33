"""The pod annotations and label the injector reads and writes, and the rules for their values (shared by the
flags and the pods)."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

# Pod annotations (and the one pod label) the webhook reads and writes.
PREFIX = "budgetwarden.io/"
INJECT = PREFIX + "inject"
STATUS = PREFIX + "status"
# A label, because a NetworkPolicy can select pods by label only: it lets injected pods reach Redis.
SIDECAR_LABEL = PREFIX + "sidecar"
TENANT = PREFIX + "tenant"
TASK_TYPE = PREFIX + "task-type"
CPU = PREFIX + "cpu"
CPU_LIMIT = PREFIX + "cpu-limit"
MEMORY = PREFIX + "memory"
MEMORY_LIMIT = PREFIX + "memory-limit"
FAIL_MODE = PREFIX + "fail-mode"
LOG_LEVEL = PREFIX + "log-level"
KNOWN_ANNOTATIONS = frozenset(
    {INJECT, STATUS, TENANT, TASK_TYPE, CPU, CPU_LIMIT, MEMORY, MEMORY_LIMIT, FAIL_MODE, LOG_LEVEL}
)
STATUS_INJECTED = "injected"

SIDECAR_NAME = "budgetwarden"
POLICY_VOLUME = "budgetwarden-policy"
POLICY_MOUNT = "/etc/budgetwarden/policy"
ADDR_ENV = "BUDGETWARDEN_ADDR"
# Environment variables the injector owns in the sidecar; --sidecar-env may not set them.
RESERVED_SIDECAR_ENV = frozenset(
    {
        "BUDGETWARDEN_TENANT",
        "BUDGETWARDEN_DEFAULT_TASK_TYPE",
        "BUDGETWARDEN_REDIS_URL",
        "BUDGETWARDEN_REDIS_CLUSTER",
        "POD_NAME",
        "POD_NAMESPACE",
        "POD_UID",
        "NODE_NAME",
    }
)

_TRUE = frozenset({"true", "enabled", "yes", "on", "1"})
_FALSE = frozenset({"false", "disabled", "no", "off", "0"})
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_CONFIGMAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_QUANTITY = re.compile(
    r"^(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
)
_SUFFIX = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}
_FAIL_MODES = ("open", "closed")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _ident(value: str, max_bytes: int = 256) -> str:
    """The server's rule for ids: present, at most 256 bytes of UTF-8, no control characters."""
    if not value:
        raise ValueError("must not be empty")
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ValueError(f"is longer than {max_bytes} bytes")
    if any(ch < " " or ch == "\x7f" for ch in value):
        raise ValueError("contains control characters")
    return value


def _quantity(text: str, *, allow_none: bool = False) -> Decimal | None:
    """A Kubernetes resource quantity (``250m``, ``1.5``, ``128Mi``, ``1e3``), as a number; ``none`` when allowed."""
    if allow_none and text.strip().lower() == "none":
        return None
    match = _QUANTITY.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a resource quantity (like 100m, 0.5, 128Mi or 1Gi)")
    suffix = match.group("suffix") or ""
    number = Decimal(match.group("number"))
    if suffix[:1] in ("e", "E"):
        return number * (Decimal(10) ** int(suffix[1:]))
    return number * _SUFFIX[suffix]


def _inject_flag(value: Any) -> bool | None:
    if not isinstance(value, str):
        return None
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(value)
