"""Who may call the admin API: bearer tokens and client certificates named in an access file, each with a role and
the tenants it may act on.

The file (YAML or JSON) holds no secret: tokens are stored as their SHA-256, compared in constant time. It is read
again when it changes, checked at each call (one stat), so a new or revoked token applies at the next call; a changed
file that does not load is logged and the previous one stays in force.

    tokens:
      - {name: alice, sha256: <hex>, role: approver, tenants: [acme]}
    clients:                       # mutual TLS: the client certificate's SAN (URI or DNS name)
      - {name: console, san: spiffe://prod/ns/budgetwarden/sa/console, role: viewer, tenants: "*"}
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import grpc
import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

log = logging.getLogger("budgetwarden.admin.auth")


class Role(enum.IntEnum):
    """Each role may do what the roles below it may."""

    VIEWER = 1  # read windows and checkpoints
    APPROVER = 2  # approve and deny checkpoints
    ADMIN = 3  # set ceilings, reset tasks


Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")]
RoleName = Literal["viewer", "approver", "admin"]


class _Grant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    role: RoleName
    tenants: Literal["*"] | Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=1)]


class _TokenGrant(_Grant):
    sha256: Sha256Hex


class _ClientGrant(_Grant):
    san: Annotated[str, StringConstraints(min_length=1)]


class _AccessModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: list[_TokenGrant] = []
    clients: list[_ClientGrant] = []


@dataclass(frozen=True, slots=True)
class Identity:
    """A caller the access file names (or, without one, the local caller of a loopback listener)."""

    name: str
    role: Role
    tenants: frozenset[str] | None  # None: every tenant
    via: str  # token, certificate, or none (no access file)

    def may_act_on(self, tenant_id: str) -> bool:
        return self.tenants is None or tenant_id in self.tenants

    @property
    def role_name(self) -> str:
        return self.role.name.lower()


LOCAL_CALLER = Identity("local", Role.ADMIN, None, "none")


def _identity(grant: _Grant, via: str) -> Identity:
    tenants = None if grant.tenants == "*" else frozenset(grant.tenants)
    return Identity(grant.name, Role[grant.role.upper()], tenants, via)


class AccessFileError(ValueError):
    """An access file that cannot be read or is not valid; the message names the file and the field."""


def _load(path: Path) -> _AccessModel:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise AccessFileError(f"{path}: cannot read the admin tokens file: {exc}") from None
    try:
        return _AccessModel.model_validate(data or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise AccessFileError(f"{path}: {where}: {first['msg']}") from None


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh bearer token: 256 random bits, URL-safe, prefixed so it is recognised in a leak scan."""
    return "bwat_" + secrets.token_urlsafe(32)


class AccessFile:
    """The access file, read again when its stamp (inode, mtime, size) changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._model = _load(path)  # a bad file at start is an error, not a warning
        self.loads = 1

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def current(self) -> _AccessModel:
        stamp = self._stat()
        if stamp is not None and stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    self._stamp = stamp
                    try:
                        self._model = _load(self.path)
                    except AccessFileError as exc:
                        log.error("admin tokens file rejected; the previous one stays in force: %s", exc)
                    else:
                        self.loads += 1
                        log.info("admin tokens file reloaded", extra={"file": str(self.path)})
        return self._model

    def by_token(self, token: str) -> Identity | None:
        """The token's grant. Every entry is compared, in constant time, whatever matches."""
        presented = token_digest(token)
        found: _TokenGrant | None = None
        for grant in self.current().tokens:
            if hmac.compare_digest(presented, grant.sha256.lower()):
                found = grant
        return None if found is None else _identity(found, "token")

    def by_certificate(self, names: list[str]) -> Identity | None:
        """The grant of the first client entry whose SAN the certificate carries."""
        for grant in self.current().clients:
            if any(hmac.compare_digest(grant.san.encode(), name.encode()) for name in names):
                return _identity(grant, "certificate")
        return None


class UnauthenticatedError(Exception):
    """No credentials, or credentials the access file does not name. The message says which, never the token."""


def bearer_token(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise UnauthenticatedError("the authorization metadata is not 'Bearer <token>'")
            return token.strip()
    return None


def certificate_names(context: grpc.aio.ServicerContext[Any, Any]) -> list[str]:
    """The SANs (URIs, DNS names) of the client certificate the TLS handshake verified; empty without one."""
    auth = context.auth_context() or {}
    return [value.decode() for value in auth.get("x509_subject_alternative_name", [])]


def authenticate(access: AccessFile | None, context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
    """The caller, by bearer token first, else by client certificate. Raises UnauthenticatedError."""
    if access is None:
        return LOCAL_CALLER
    token = bearer_token(context)
    if token is not None:
        found = access.by_token(token)
        if found is None:
            raise UnauthenticatedError("the bearer token is not known")
        return found
    names = certificate_names(context)
    if names:
        found = access.by_certificate(names)
        if found is None:
            raise UnauthenticatedError("the client certificate is not named in the admin tokens file")
        return found
    raise UnauthenticatedError(
        "credentials are required: a bearer token (authorization: Bearer <token>) or a client certificate"
    )
