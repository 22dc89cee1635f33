"""How the sidecar reaches Redis beyond its URL: ACL credentials (a password read from a Secret's file for every new
connection) and TLS (a CA of its own, an optional client certificate). The same options go to every client it makes:
the budget store, readiness pings and the gauge reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from redis.credentials import CredentialProvider

from ._config import Settings


class PasswordFileCredentials(CredentialProvider):
    """Reads the password file each time a connection authenticates, so a rotated Secret (the kubelet rewrites the
    mounted file) applies to new connections without a restart; a file that cannot be read fails that connection,
    which the limiter turns into its fail mode, like any store error."""

    def __init__(self, username: str | None, password_file: Path) -> None:
        self.username = username
        self.password_file = password_file

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = self.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        return (password,) if self.username is None else (self.username, password)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        # A few bytes read once per new connection: not worth a thread.
        return self.get_credentials()


def redis_access_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for redis-py's ``from_url`` (sync, asyncio and cluster alike); empty when the URL says all."""
    options: dict[str, Any] = {}
    if settings.redis_password_file is not None:
        options["credential_provider"] = PasswordFileCredentials(settings.redis_username, settings.redis_password_file)
    else:
        if settings.redis_username is not None:
            options["username"] = settings.redis_username
        if settings.redis_password is not None:
            options["password"] = settings.redis_password.get_secret_value()
    if settings.redis_tls_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.redis_tls_ca_file)
    if settings.redis_tls_cert_file is not None and settings.redis_tls_key_file is not None:
        options["ssl_certfile"] = str(settings.redis_tls_cert_file)
        options["ssl_keyfile"] = str(settings.redis_tls_key_file)
    return options
