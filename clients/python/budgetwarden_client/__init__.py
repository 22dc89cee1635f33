"""Python client for the budgetwarden sidecar.

``BudgetClient`` (blocking) and ``AsyncBudgetClient`` (asyncio) call the sidecar at ``BUDGETWARDEN_ADDR`` (default
``127.0.0.1:50151``); ``pb`` is the generated message module (``pb.CheckRequest``, ``pb.DECISION_ALLOW``, ...).
"""

from budgetwarden_api.v1 import admin_pb2 as admin_pb
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client._client import (
    DEFAULT_ADDR,
    DEFAULT_ADMIN_ADDR,
    AdminClient,
    AsyncBudgetClient,
    BudgetClient,
    default_addr,
)
from budgetwarden_client._reporter import BackgroundReporter
from budgetwarden_client._stats import ReporterStats
from budgetwarden_client._stream import CheckRefusedError, CheckStream

__all__ = [
    "DEFAULT_ADDR",
    "DEFAULT_ADMIN_ADDR",
    "AdminClient",
    "AsyncBudgetClient",
    "BackgroundReporter",
    "BudgetClient",
    "CheckRefusedError",
    "CheckStream",
    "ReporterStats",
    "admin_pb",
    "default_addr",
    "pb",
]
