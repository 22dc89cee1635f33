"""Python client for the budgetwarden sidecar.

The step API: ``Budget`` (blocking) and ``AsyncBudget`` (asyncio) check a step on entering ``budget.step(...)`` and
report its usage on leaving; a step that may not run raises a ``BudgetError`` (``CheckpointRequired``,
``BudgetDenied``, ``BudgetUnavailable``).

The low-level API: ``BudgetClient`` (blocking) and ``AsyncBudgetClient`` (asyncio) call the sidecar at
``BUDGETWARDEN_ADDR`` (default ``127.0.0.1:50151``); ``pb`` is the generated message module (``pb.CheckRequest``,
``pb.DECISION_ALLOW``, ...).
"""

from budgetwarden_api.v1 import admin_pb2 as admin_pb
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client._budget import DEFAULT_DEADLINE, AsyncBudget, AsyncStepScope, Budget, StepScope
from budgetwarden_client._channels import ClientTls
from budgetwarden_client._client import (
    DEFAULT_ADDR,
    DEFAULT_ADMIN_ADDR,
    RETRY_SERVICE_CONFIG,
    AdminClient,
    AsyncBudgetClient,
    BudgetClient,
    default_addr,
    default_tenant,
)
from budgetwarden_client._errors import BudgetDenied, BudgetError, BudgetUnavailable, CheckpointRequired
from budgetwarden_client._messages import IMAGE_TOKENS, IMAGE_TOKENS_LOW, Message
from budgetwarden_client._reporter import BackgroundReporter
from budgetwarden_client._stats import ReporterStats
from budgetwarden_client._step import FailMode, Step
from budgetwarden_client._stream import CheckRefusedError, CheckStream
from budgetwarden_client._throttle import AdaptiveThrottle

__all__ = [
    "DEFAULT_ADDR",
    "DEFAULT_ADMIN_ADDR",
    "DEFAULT_DEADLINE",
    "IMAGE_TOKENS",
    "IMAGE_TOKENS_LOW",
    "RETRY_SERVICE_CONFIG",
    "AdaptiveThrottle",
    "AdminClient",
    "AsyncBudget",
    "AsyncBudgetClient",
    "AsyncStepScope",
    "BackgroundReporter",
    "Budget",
    "BudgetClient",
    "BudgetDenied",
    "BudgetError",
    "BudgetUnavailable",
    "CheckRefusedError",
    "CheckStream",
    "CheckpointRequired",
    "ClientTls",
    "FailMode",
    "Message",
    "ReporterStats",
    "Step",
    "StepScope",
    "admin_pb",
    "default_addr",
    "default_tenant",
    "pb",
]
