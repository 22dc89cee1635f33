"""The application: the ``Sidecar`` composition root, its settings and logging.

Settings and logging import nothing heavy, so the CLI's client commands load them without grpc servers, Redis or
OpenTelemetry; ``Sidecar`` and ``serve`` load the whole stack on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._config import ConfigFileError, Settings, load_settings
from ._logging import configure as configure_logging

if TYPE_CHECKING:
    from ._control_plane import ControlPlane, serve_control_plane
    from ._redis_access import redis_access_options
    from ._sidecar import Sidecar, serve

__all__ = [
    "ConfigFileError",
    "ControlPlane",
    "Settings",
    "Sidecar",
    "configure_logging",
    "load_settings",
    "redis_access_options",
    "serve",
    "serve_control_plane",
]


def __getattr__(name: str) -> Any:
    if name in ("Sidecar", "serve"):
        from . import _sidecar

        return getattr(_sidecar, name)
    if name in ("ControlPlane", "serve_control_plane"):
        from . import _control_plane

        return getattr(_control_plane, name)
    if name == "redis_access_options":
        from . import _redis_access

        return _redis_access.redis_access_options
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
