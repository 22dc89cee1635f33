"""The admin listener, as a sidecar serves it (for local use) and as the control plane serves it: who may call it
(``admin_access``) and the server itself (``admin_server``)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from budgetwarden.limiter import Limiter
from budgetwarden.transport import ADMIN_SERVICE_NAME, AccessFile, AccessFileError, AdminServicer

from ._config import Settings
from ._sidecar import _SERVER_OPTIONS, _is_loopback, enable_reflection


def admin_access(settings: Settings, address: str | None, setting: str = "admin_listen") -> AccessFile | None:
    """The admin tokens file, loaded (a bad one is refused at start). Without one, no credentials are asked, which
    only a loopback listener may do: anyone reaching a wider one could approve checkpoints and raise ceilings."""
    if settings.admin_tokens_file is None:
        if address is not None and not _is_loopback(address):
            raise OSError(
                f"{setting} {address} is not a loopback address and no admin_tokens_file is set: set "
                "admin_tokens_file (docs/operators.md) to require credentials, or listen on 127.0.0.1"
            )
        return None
    try:
        return AccessFile(settings.admin_tokens_file)
    except AccessFileError as exc:
        raise OSError(f"admin_tokens_file: {exc}") from None


def admin_server(
    limiter: Limiter, settings: Settings, access: AccessFile | None, health_servicer: health.aio.HealthServicer | None
) -> grpc.aio.Server:
    """A server (not bound yet) with BudgetAdminService, reflection and, when given, health."""
    server = grpc.aio.server(options=_SERVER_OPTIONS)
    servicer = AdminServicer(limiter, deadline_margin_s=settings.deadline_margin_ms / 1000, access=access)
    server.add_generic_rpc_handlers([servicer.handler()])
    names = [ADMIN_SERVICE_NAME]
    if health_servicer is not None:
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        names.append(health.SERVICE_NAME)
    enable_reflection(server, names)
    return server
