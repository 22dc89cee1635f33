"""The webhook's serving certificate: from files (reloaded when they change) or self-signed (renewed in memory)."""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import ssl
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ._config import InjectConfig, _bool, _env_name
from ._exceptions import InjectConfigError, InjectError

log = logging.getLogger("budgetwarden.inject")

RENEW_BEFORE = dt.timedelta(days=30)


class CertificateSource(Protocol):
    def context(self) -> ssl.SSLContext: ...

    def poll(self) -> None: ...


def _new_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


def context_from_pem(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """An SSLContext from PEM bytes, without writing the key to disk when the platform allows (memfd)."""
    context = _new_context()
    blob = cert_pem + b"\n" + key_pem
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        with contextlib.suppress(OSError):
            fd = memfd("budgetwarden-tls")
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
                context.load_cert_chain(f"/proc/self/fd/{fd}")
                return context
            finally:
                os.close(fd)
    with tempfile.TemporaryDirectory(prefix="budgetwarden-tls-") as tmp:
        path = Path(tmp) / "tls.pem"
        path.touch(mode=0o600)
        path.write_bytes(blob)
        context.load_cert_chain(path)
    return context


def _fingerprint(cert_pem: bytes) -> str:
    try:
        der = ssl.PEM_cert_to_DER_cert(cert_pem.decode("ascii", "replace"))
    except ValueError:
        return "?"
    return hashlib.sha256(der).hexdigest()[:16]


class FileCertificate:
    """tls.crt / tls.key from files (a cert-manager Secret), reloaded when they change. Handshakes that start after
    a reload use the new certificate; a pair that does not load (half-written, mismatched) leaves the old in force."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        try:
            self._stamp = self._read_stamp()  # before loading: a change during the load is seen by the next poll
        except OSError as exc:
            raise InjectError(
                f"cannot read the TLS certificate {exc.filename}: {exc.strerror or exc} "
                "(mount the Secret with tls.crt and tls.key, or use --self-signed)"
            ) from None
        self._context, self.fingerprint = self._load()
        self._failed_stamp: object = None

    def _read_stamp(self) -> tuple[tuple[int, int, int, int], ...]:
        # stat follows symlinks: a Secret volume's atomic ..data swap changes the inode.
        stats = (os.stat(self.cert_file), os.stat(self.key_file))
        return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def _load(self) -> tuple[ssl.SSLContext, str]:
        try:
            cert_pem = self.cert_file.read_bytes()
        except OSError as exc:
            raise InjectError(f"cannot read the TLS certificate {self.cert_file}: {exc.strerror or exc}") from None
        try:
            self.key_file.read_bytes()
        except OSError as exc:
            raise InjectError(f"cannot read the TLS key {self.key_file}: {exc.strerror or exc}") from None
        context = _new_context()
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as exc:
            reason = "the certificate and the key do not match" if "MISMATCH" in str(exc) else (exc.reason or str(exc))
            raise InjectError(f"cannot load the TLS pair {self.cert_file}, {self.key_file}: {reason}") from None
        except OSError as exc:
            raise InjectError(f"cannot load the TLS pair {self.cert_file}, {self.key_file}: {exc}") from None
        return context, _fingerprint(cert_pem)

    def context(self) -> ssl.SSLContext:
        return self._context

    def poll(self) -> None:
        try:
            stamp = self._read_stamp()
        except OSError as exc:
            if self._failed_stamp != "missing":
                log.error("certificate files unreadable; the loaded certificate stays", extra={"error": str(exc)})
                self._failed_stamp = "missing"
            return
        if stamp == self._stamp:
            return
        try:
            context, fingerprint = self._load()
        except InjectError as exc:
            if self._failed_stamp != stamp:
                log.error("new certificate not loaded; the old one stays", extra={"error": str(exc)})
                self._failed_stamp = stamp
            return
        self._context, self._stamp, self.fingerprint, self._failed_stamp = context, stamp, fingerprint, None
        log.info("certificate reloaded from %s (sha256 %s)", self.cert_file, fingerprint, extra={"sha256": fingerprint})


def _crypto() -> Any:
    try:
        from cryptography import x509
    except ImportError:  # pragma: no cover - a runtime dependency
        raise InjectError("--self-signed needs the 'cryptography' package (pip install cryptography)") from None
    return x509


def _key_usage(x509: Any, *, signs_certificates: bool) -> Any:
    """Digital signatures, and for a CA the signing of certificates and revocation lists as well."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _pem(cert: Any, key: Any) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM in PKCS #8, unencrypted)."""
    from cryptography.hazmat.primitives import serialization

    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def generate_ca(common_name: str = "budgetwarden-injector-ca", days: int = 3650) -> tuple[bytes, bytes]:
    """A new CA (ECDSA P-256): (certificate PEM, key PEM)."""
    x509 = _crypto()
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(x509, signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _pem(cert, key)


def issue_serving_certificate(
    ca_cert_pem: bytes, ca_key_pem: bytes, dns_names: Sequence[str], days: int = 365
) -> tuple[bytes, bytes]:
    """A serving certificate for ``dns_names`` (DNS names or IP addresses) signed by the CA: (cert PEM, key PEM)."""
    x509 = _crypto()
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[Any] = []
    for name in dns_names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0][:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(x509, signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _pem(cert, key)


def load_or_create_ca(directory: Path | None) -> tuple[bytes, bytes]:
    """The CA kept in ``directory`` (ca.crt, ca.key), created there if absent; a fresh one when no directory."""
    if directory is None:
        return generate_ca()
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    try:
        if cert_path.exists() or key_path.exists():
            return cert_path.read_bytes(), key_path.read_bytes()
        directory.mkdir(parents=True, exist_ok=True)
        cert_pem, key_pem = generate_ca()
        # The key first, created private; the certificate last, so a present ca.crt means a complete pair.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key_pem)
        cert_path.write_bytes(cert_pem)
        return cert_pem, key_pem
    except OSError as exc:
        raise InjectError(f"cannot keep the self-signed CA in {directory}: {exc.strerror or exc}") from None


class SelfSignedCertificate:
    """A CA (kept in a directory, or made at start) and a serving certificate for the Service's DNS names, renewed in
    memory 30 days before it expires."""

    def __init__(self, dns_names: Sequence[str], directory: Path | None = None) -> None:
        self.dns_names = tuple(dns_names)
        self.ca_cert_pem, self._ca_key_pem = load_or_create_ca(directory)
        try:
            self._issue()
        except (ValueError, TypeError, ssl.SSLError) as exc:
            raise InjectError(
                f"cannot use the self-signed CA{f' in {directory}' if directory else ''}: {exc}"
            ) from None

    @property
    def ca_bundle(self) -> str:
        """The base64 PEM for ``caBundle`` in the MutatingWebhookConfiguration."""
        return base64.b64encode(self.ca_cert_pem).decode()

    def _issue(self) -> None:
        x509 = _crypto()
        cert_pem, key_pem = issue_serving_certificate(self.ca_cert_pem, self._ca_key_pem, self.dns_names)
        self._context = context_from_pem(cert_pem, key_pem)
        self.cert_pem = cert_pem
        self.expires = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc
        self.fingerprint = _fingerprint(cert_pem)

    def context(self) -> ssl.SSLContext:
        return self._context

    def poll(self) -> None:
        if self.expires - dt.datetime.now(dt.UTC) < RENEW_BEFORE:
            self._issue()
            log.info("self-signed serving certificate renewed", extra={"expires": self.expires.isoformat()})


def certificate_source(config: InjectConfig) -> CertificateSource:
    if config.self_signed:
        return SelfSignedCertificate(config.service_dns_names, config.self_signed_dir)
    return FileCertificate(config.tls_cert_file, config.tls_key_file)


def ca_bundle(config_args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str:
    """For ``--print-ca-bundle``: the base64 CA of --self-signed-dir (created if absent)."""
    env = os.environ if environ is None else environ
    directory = config_args.self_signed_dir or env.get(_env_name("self_signed_dir"))
    self_signed = config_args.self_signed
    if self_signed is None:
        self_signed = _bool(env.get(_env_name("self_signed"), "false"))
    if not self_signed or not directory:
        raise InjectConfigError(
            "--print-ca-bundle needs --self-signed and --self-signed-dir (a CA made in memory is gone at exit); "
            "with cert-manager, the caBundle is injected for you"
        )
    cert_pem, _ = load_or_create_ca(Path(directory))
    return base64.b64encode(cert_pem).decode()
