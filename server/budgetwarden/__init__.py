"""budgetwarden: a token-budget sidecar for AI agents.

The public surface is the gRPC contract (``budgetwarden_api.v1``), the ``budgetwarden`` command and the client library
(``budgetwarden_client``). Modules here whose names start with an underscore are private.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
