"""TLS for the sidecar's gRPC listeners, with certificates read again when their files change.

grpc asks ``fetch`` for a new configuration at every TLS handshake; a changed file is loaded only once it parses and
its key matches its certificate, so a renewal written in two steps (cert-manager writes the Secret, the kubelet swaps
the files) never leaves the listener with a broken pair: until then the previous pair keeps serving.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import grpc

log = logging.getLogger("budgetwarden.tls")


class ReloadingServerCredentials:
    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.files = (cert_file, key_file) + ((client_ca_file,) if client_ca_file is not None else ())
        self.client_ca_file = client_ca_file
        self._stamps = self._stat()
        self.loads = 0  # configurations loaded, the first included (for tests and logs)
        self._initial = self._load()  # unreadable or mismatched files at start are an error, not a warning

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            self._fetch,  # type: ignore[arg-type]  # the stub omits None, which grpc documents as "no change"
            require_client_authentication=self.client_ca_file is not None,
        )

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in self.files:
            stat = path.stat()
            stamps.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
        return tuple(stamps)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert_file, key_file = self.files[0], self.files[1]
        # The ssl module checks what grpc would only find at the next handshake: PEM that parses, a key that matches.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file)
        client_ca = self.client_ca_file.read_bytes() if self.client_ca_file is not None else None
        if client_ca is not None:
            ssl.create_default_context(cadata=client_ca.decode("ascii"))
        config = grpc.ssl_server_certificate_configuration(
            [(key_file.read_bytes(), cert_file.read_bytes())], root_certificates=client_ca
        )
        self.loads += 1
        return config

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamps = self._stat()
            if stamps == self._stamps:
                return None
            config = self._load()
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.warning("TLS files changed but do not load; the previous certificate keeps serving: %s", exc)
            return None
        self._stamps = stamps
        log.info("TLS certificate reloaded", extra={"cert_file": str(self.files[0])})
        return config
