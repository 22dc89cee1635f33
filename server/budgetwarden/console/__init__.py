"""The web console of the control plane: tenants' windows, open checkpoints to approve or deny, recent admin actions.
Server-rendered (Starlette, Jinja2), served by uvicorn on the control plane's event loop. Behind the admin tokens
file, with the rules of the admin API (``budgetwarden.transport``: who may do what) and its audit trail."""

from ._app import SESSION_COOKIE, console_app
from ._server import ConsoleServer, ReloadingContext, parse_address

__all__ = ["SESSION_COOKIE", "ConsoleServer", "ReloadingContext", "console_app", "parse_address"]
