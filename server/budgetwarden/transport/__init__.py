"""The gRPC transport: servicers that validate requests, call the limiter, map its errors to status codes and encode
its answers. Imports the limiter, the store's ids and the domain."""

from ._admin import ADMIN_SERVICE_NAME, RPC_ROLES, AdminServicer, audit_entry, authorisation_refusal
from ._admission import Admission
from ._answering import ERROR_DOMAIN, STORE_UNAVAILABLE
from ._auth import LOCAL_CALLER, AccessFile, AccessFileError, Identity, Role, new_token, token_digest
from ._service import BUDGET_SERVICE_NAME, BudgetServicer

__all__ = [
    "ADMIN_SERVICE_NAME",
    "BUDGET_SERVICE_NAME",
    "ERROR_DOMAIN",
    "LOCAL_CALLER",
    "RPC_ROLES",
    "STORE_UNAVAILABLE",
    "AccessFile",
    "AccessFileError",
    "AdminServicer",
    "Admission",
    "BudgetServicer",
    "Identity",
    "Role",
    "audit_entry",
    "authorisation_refusal",
    "new_token",
    "token_digest",
]
