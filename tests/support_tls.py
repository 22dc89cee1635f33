"""Certificates made for a test (a CA, server and client certificates signed by it), and a real Redis started with
TLS: Debian's redis-server, built with TLS (the embedded Valkey wheel has none; `make test` installs the package)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from support import free_port

TLS_REDIS_ENV = "BUDGETWARDEN_TEST_TLS_REDIS"  # a redis-server or valkey-server built with TLS, if not on PATH


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes()


class Authority:
    """A certificate authority that signs certificates for 127.0.0.1 and localhost (servers) or a name (clients)."""

    def __init__(self, folder: Path, name: str = "budgetwarden test CA") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._cert = (
            self._builder(subject, self._key.public_key())
            .issuer_name(subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.subject = subject
        self.ca_file = folder / "ca.pem"
        self.ca_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _builder(subject: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
        )

    def issue(self, name: str, *, client: bool = False) -> Pair:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        if client:
            names: list[x509.GeneralName] = [x509.DNSName(name)]
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
        else:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            usage = ExtendedKeyUsageOID.SERVER_AUTH
        cert = (
            self._builder(subject, key.public_key())
            .issuer_name(self.subject)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        pair = Pair(self.folder / f"{name}.crt", self.folder / f"{name}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return pair


def tls_redis_binary() -> str:
    """A Redis-compatible server built with TLS; the assertion says how to get one rather than skipping the tests."""
    candidates = [os.environ.get(TLS_REDIS_ENV), shutil.which("redis-server"), shutil.which("valkey-server")]
    for binary in filter(None, candidates):
        probe = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return binary
    raise AssertionError(
        "these tests need a Redis built with TLS: `make test` installs Debian's redis-server "
        f"(apt-get install redis-server), or set {TLS_REDIS_ENV} to a redis-server or valkey-server built with TLS"
    )


class TlsRedis:
    """A real Redis serving only TLS on a free port: client certificates required, the default user off, one ACL user
    ``budget`` with ``password``."""

    USER = "budget"

    def __init__(self, folder: Path, authority: Authority, password: str) -> None:
        self.folder = folder
        self.port = free_port()
        server = authority.issue("redis-server")
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "redis.log"
        args = [
            tls_redis_binary(),
            "--port", "0",
            "--tls-port", str(self.port),
            "--bind", "127.0.0.1",
            "--tls-cert-file", str(server.cert),
            "--tls-key-file", str(server.key),
            "--tls-ca-cert-file", str(authority.ca_file),
            "--tls-auth-clients", "yes",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(folder),
            "--logfile", str(self.log),
            "--user", "default", "off",
            "--user", self.USER, "on", f">{password}", "~*", "&*", "+@all",
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.admin_pair = authority.issue("redis-admin", client=True)
        self.ca_file = authority.ca_file
        self._wait_ready(password)

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def client(self, password: str) -> redis.Redis:
        return redis.Redis.from_url(
            self.url,
            username=self.USER,
            password=password,
            ssl_ca_certs=str(self.ca_file),
            ssl_certfile=str(self.admin_pair.cert),
            ssl_keyfile=str(self.admin_pair.key),
        )

    def _wait_ready(self, password: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                log = self.log.read_text(errors="replace") if self.log.exists() else ""
                raise AssertionError(f"redis-server with TLS exited with {self.process.returncode}:\n{log[-2000:]}")
            try:
                with self.client(password) as client:
                    if client.ping():
                        return
            except (redis.RedisError, OSError):
                pass
            assert time.monotonic() < deadline, f"redis-server with TLS did not answer within {timeout}s"
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
