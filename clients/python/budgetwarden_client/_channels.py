"""Channels to the sidecar or the control plane: plaintext by default (the sidecar listens on loopback in the pod), TLS
when a CA or a client certificate is given, in code or by environment variables."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

CA_FILE_ENV = "BUDGETWARDEN_CLIENT_TLS_CA_FILE"
CERT_FILE_ENV = "BUDGETWARDEN_CLIENT_TLS_CERT_FILE"
KEY_FILE_ENV = "BUDGETWARDEN_CLIENT_TLS_KEY_FILE"
ADMIN_TOKEN_ENV = "BUDGETWARDEN_ADMIN_TOKEN"


@dataclass(frozen=True, kw_only=True)
class ClientTls:
    """TLS to a listener that serves it: ``ca_file`` verifies the server (unset: the system's CAs); ``cert_file`` and
    ``key_file`` (together) present a client certificate for mutual TLS."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("ClientTls: cert_file and key_file go together")

    @classmethod
    def from_env(cls) -> ClientTls | None:
        """From ``BUDGETWARDEN_CLIENT_TLS_CA_FILE``, ``..._CERT_FILE`` and ``..._KEY_FILE``; None when none is set."""
        files = {name: os.environ.get(env) for name, env in _ENV.items()}
        if not any(files.values()):
            return None
        return cls(**{name: Path(value) if value else None for name, value in files.items()})

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )


_ENV = {"ca_file": CA_FILE_ENV, "cert_file": CERT_FILE_ENV, "key_file": KEY_FILE_ENV}


def open_channel(addr: str, *, tls: ClientTls | None, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(addr, options=list(options))
    return grpc.secure_channel(addr, tls.credentials(), options=list(options))


def open_aio_channel(addr: str, *, tls: ClientTls | None, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(addr, options=list(options))
    return grpc.aio.secure_channel(addr, tls.credentials(), options=list(options))


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The admin API's credentials: ``token``, else ``BUDGETWARDEN_ADMIN_TOKEN``; none when neither is set."""
    token = token if token is not None else os.environ.get(ADMIN_TOKEN_ENV, "").strip() or None
    return (("authorization", f"Bearer {token}"),) if token else ()
