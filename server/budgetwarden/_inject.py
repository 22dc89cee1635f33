"""Sidecar injection: a Kubernetes mutating admission webhook that adds the budgetwarden sidecar to agent pods.

``budgetwarden inject-webhook`` serves HTTPS and answers ``admission.k8s.io/v1`` AdmissionReviews for pod CREATE with
a JSONPatch. Routes:

- ``POST /mutate``: inject pods that opt in (annotation or label ``budgetwarden.io/inject: "true"``); with
  ``--inject-all``, inject every pod that does not opt out (``"false"``).
- ``POST /mutate-all``: always "inject unless the pod opts out". The webhook sees only the pod, never its namespace's
  labels, so per-namespace opt-in is done by the MutatingWebhookConfiguration: a webhook entry whose namespaceSelector
  matches ``budgetwarden.io/inject=enabled`` calls ``/mutate-all``, another for the remaining namespaces calls
  ``/mutate``.
- ``GET /healthz`` (the process serves) and ``GET /readyz`` (a certificate is loaded and the server is not draining).

Answers, by what arrives (the policy the README documents):

- a body that is not a JSON AdmissionReview ``admission.k8s.io/v1`` with ``request.uid``: HTTP 400 and a one-line
  message (no valid AdmissionReview can be answered without the uid; the API server applies its failurePolicy);
- a well-formed review the webhook does not change (not a pod, not CREATE, no object, excluded namespace, not opted
  in, host network, already injected): ``allowed: true``, no patch, the reason in ``status.message`` and, where the
  request looks misrouted or suspicious, in ``warnings`` (shown by kubectl);
- an opted-in pod whose ``budgetwarden.io/*`` annotations are invalid: ``allowed: false``, code 400, naming the
  annotation (injecting a guess would silently bind the wrong tenant or resources);
- otherwise ``allowed: true`` with ``patchType: JSONPatch`` and the base64 patch.

Nothing a client sends can stop the server: every request is handled in its own thread and every error is answered.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import socketserver
import ssl
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, Protocol
from urllib.parse import urlsplit

log = logging.getLogger("budgetwarden.inject")

# Pod annotations (and the one pod label) the webhook reads and writes.
PREFIX = "budgetwarden.io/"
INJECT = PREFIX + "inject"
STATUS = PREFIX + "status"
# A label, because a NetworkPolicy can select pods by label only: it lets injected pods reach Redis.
SIDECAR_LABEL = PREFIX + "sidecar"
TENANT = PREFIX + "tenant"
TASK_TYPE = PREFIX + "task-type"
CPU = PREFIX + "cpu"
CPU_LIMIT = PREFIX + "cpu-limit"
MEMORY = PREFIX + "memory"
MEMORY_LIMIT = PREFIX + "memory-limit"
FAIL_MODE = PREFIX + "fail-mode"
LOG_LEVEL = PREFIX + "log-level"
KNOWN_ANNOTATIONS = frozenset(
    {INJECT, STATUS, TENANT, TASK_TYPE, CPU, CPU_LIMIT, MEMORY, MEMORY_LIMIT, FAIL_MODE, LOG_LEVEL}
)
STATUS_INJECTED = "injected"

SIDECAR_NAME = "budgetwarden"
POLICY_VOLUME = "budgetwarden-policy"
POLICY_MOUNT = "/etc/budgetwarden/policy"
ADDR_ENV = "BUDGETWARDEN_ADDR"
# Environment variables the injector owns in the sidecar; --sidecar-env may not set them.
RESERVED_SIDECAR_ENV = frozenset(
    {
        "BUDGETWARDEN_TENANT",
        "BUDGETWARDEN_DEFAULT_TASK_TYPE",
        "BUDGETWARDEN_REDIS_URL",
        "BUDGETWARDEN_REDIS_CLUSTER",
        "POD_NAME",
        "POD_NAMESPACE",
        "POD_UID",
        "NODE_NAME",
    }
)

ADMISSION_API_VERSION = "admission.k8s.io/v1"
MAX_BODY_BYTES = 8 * 1024 * 1024  # the API server sends at most ~3 MiB objects
HANDSHAKE_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 120.0  # longer than the API server's idle-connection timeout (90 s), so it always closes first
MAX_CONNECTIONS = 256
RENEW_BEFORE = dt.timedelta(days=30)

_TRUE = frozenset({"true", "enabled", "yes", "on", "1"})
_FALSE = frozenset({"false", "disabled", "no", "off", "0"})
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_CONFIGMAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_QUANTITY = re.compile(
    r"^(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
)
_SUFFIX = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}
_FAIL_MODES = ("open", "closed")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class InjectError(Exception):
    """A problem that stops the webhook from starting (bad certificate, port in use); one line, for the CLI."""


class InjectConfigError(InjectError):
    """A bad flag or environment variable."""


class AnnotationError(ValueError):
    """An opted-in pod's budgetwarden.io/* annotation that cannot be honoured."""


# --------------------------------------------------------------------------------------------------------------------
# Configuration: flags over BUDGETWARDEN_INJECT_* environment variables over defaults.


@dataclass(frozen=True)
class InjectConfig:
    sidecar_image: str = ""
    listen: str = "0.0.0.0:8443"
    tls_cert_file: Path = Path("/etc/budgetwarden/tls/tls.crt")
    tls_key_file: Path = Path("/etc/budgetwarden/tls/tls.key")
    cert_reload_seconds: float = 10.0
    self_signed: bool = False
    self_signed_dir: Path | None = None
    service_name: str = "budgetwarden-injector"
    namespace: str = "budgetwarden"
    dns_names: tuple[str, ...] = ()
    skip_namespaces: tuple[str, ...] = ("kube-system", "kube-public", "kube-node-lease")
    inject_all: bool = False
    legacy_sidecar: bool = False
    redis_url: str = ""
    redis_url_secret: str = ""
    redis_cluster: bool = False
    policy_configmap: str = "budgetwarden-policy"
    policy_key: str = "policy.yaml"
    tenant_source: str = "annotation"
    default_tenant: str = ""
    sidecar_image_pull_policy: str = "IfNotPresent"
    sidecar_fail_mode: str = "closed"
    sidecar_log_level: str = "INFO"
    sidecar_cpu_request: str = "50m"
    sidecar_cpu_limit: str = "none"
    sidecar_memory_request: str = "64Mi"
    sidecar_memory_limit: str = "256Mi"
    sidecar_user: int = 65532
    sidecar_port: int = 50151
    sidecar_health_port: int = 50160
    sidecar_metrics_port: int = 0
    sidecar_env: tuple[tuple[str, str], ...] = ()
    shutdown_delay_seconds: float = 5.0
    log_level: str = "INFO"
    log_format: str = "json"

    @property
    def service_dns_names(self) -> tuple[str, ...]:
        svc, ns = self.service_name, self.namespace
        base = (svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local")
        return tuple(dict.fromkeys((*base, *self.dns_names)))

    @property
    def redis_secret_ref(self) -> tuple[str, str]:
        name, _, key = self.redis_url_secret.partition(":")
        return name, key or "redis-url"

    def validate(self) -> InjectConfig:
        """Every problem a pod could only reveal later is found here, at start."""

        def bad(flag: str, problem: str) -> InjectConfigError:
            env = "BUDGETWARDEN_INJECT_" + flag.removeprefix("--").replace("-", "_").upper()
            return InjectConfigError(f"{flag} (env {env}): {problem}")

        if not self.sidecar_image:
            raise bad("--sidecar-image", "is required: the image of the budgetwarden sidecar")
        if not self.redis_url and not self.redis_url_secret:
            raise bad("--redis-url", "give the sidecars' Redis URL, or --redis-url-secret NAME[:KEY]")
        if self.redis_url and self.redis_url_secret:
            raise bad("--redis-url-secret", "give either --redis-url or --redis-url-secret, not both")
        if self.redis_url and not re.match(r"^(redis|rediss|unix)://", self.redis_url):
            raise bad("--redis-url", f"{self.redis_url.split('@')[-1]!r} is not a redis://, rediss:// or unix:// URL")
        if self.redis_url_secret:
            name, key = self.redis_secret_ref
            if not _DNS_SUBDOMAIN.match(name) or len(name) > 253:
                raise bad("--redis-url-secret", f"{name!r} is not a valid Secret name")
            if not _CONFIGMAP_KEY.match(key):
                raise bad("--redis-url-secret", f"{key!r} is not a valid Secret key")
        if self.policy_configmap and (
            not _DNS_SUBDOMAIN.match(self.policy_configmap) or len(self.policy_configmap) > 253
        ):
            raise bad("--policy-configmap", f"{self.policy_configmap!r} is not a valid ConfigMap name")
        if not _CONFIGMAP_KEY.match(self.policy_key):
            raise bad("--policy-key", f"{self.policy_key!r} is not a valid ConfigMap key")
        if self.tenant_source not in ("annotation", "namespace"):
            raise bad("--tenant-source", f"{self.tenant_source!r}: expected annotation or namespace")
        if self.default_tenant:
            try:
                _ident(self.default_tenant)
            except ValueError as exc:
                raise bad("--default-tenant", str(exc)) from None
        if self.sidecar_image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise bad("--sidecar-image-pull-policy", "expected Always, IfNotPresent or Never")
        if self.sidecar_fail_mode not in _FAIL_MODES:
            raise bad("--sidecar-fail-mode", "expected open or closed")
        if self.sidecar_log_level.upper() not in _LOG_LEVELS:
            raise bad("--sidecar-log-level", "expected DEBUG, INFO, WARNING or ERROR")
        if self.log_level.upper() not in _LOG_LEVELS:
            raise bad("--log-level", "expected DEBUG, INFO, WARNING or ERROR")
        if self.log_format not in ("json", "text"):
            raise bad("--log-format", "expected json or text")
        for flag, value, is_limit in (
            ("--sidecar-cpu-request", self.sidecar_cpu_request, False),
            ("--sidecar-cpu-limit", self.sidecar_cpu_limit, True),
            ("--sidecar-memory-request", self.sidecar_memory_request, False),
            ("--sidecar-memory-limit", self.sidecar_memory_limit, True),
        ):
            try:
                _quantity(value, allow_none=is_limit)
            except ValueError as exc:
                raise bad(flag, str(exc)) from None
        for flag, request, limit in (
            ("--sidecar-cpu-limit", self.sidecar_cpu_request, self.sidecar_cpu_limit),
            ("--sidecar-memory-limit", self.sidecar_memory_request, self.sidecar_memory_limit),
        ):
            high, low = _quantity(limit, allow_none=True), _quantity(request)
            if high is not None and low is not None and low > high:
                raise bad(flag, f"{limit} is below the request {request}")
        for flag, port in (
            ("--sidecar-port", self.sidecar_port),
            ("--sidecar-health-port", self.sidecar_health_port),
        ):
            if not 1 <= port <= 65535:
                raise bad(flag, f"{port} is not a port number")
        if self.sidecar_metrics_port and not 1 <= self.sidecar_metrics_port <= 65535:
            raise bad("--sidecar-metrics-port", f"{self.sidecar_metrics_port} is not a port number")
        ports = [self.sidecar_port, self.sidecar_health_port] + (
            [self.sidecar_metrics_port] * bool(self.sidecar_metrics_port)
        )
        if len(set(ports)) != len(ports):
            raise bad("--sidecar-health-port", "the sidecar's budget, health and metrics ports must differ")
        if self.sidecar_user < 1:
            raise bad("--sidecar-user", "must be a non-root uid (1 or more)")
        for name, _ in self.sidecar_env:
            if not _ENV_NAME.match(name):
                raise bad("--sidecar-env", f"{name!r} is not a valid environment variable name")
            if name in RESERVED_SIDECAR_ENV:
                raise bad("--sidecar-env", f"{name} is set by the injector itself")
        if self.cert_reload_seconds <= 0:
            raise bad("--cert-reload-seconds", "must be more than 0")
        if self.shutdown_delay_seconds < 0:
            raise bad("--shutdown-delay-seconds", "must not be negative")
        try:
            parse_listen(self.listen)
        except ValueError as exc:
            raise bad("--listen", str(exc)) from None
        for ns in (self.namespace, *self.skip_namespaces):
            if not _DNS_LABEL.match(ns):
                raise bad("--namespace" if ns == self.namespace else "--skip-namespaces", f"{ns!r} is not a namespace")
        return replace(self, sidecar_log_level=self.sidecar_log_level.upper(), log_level=self.log_level.upper())


@dataclass(frozen=True)
class _Option:
    name: str
    help: str
    kind: str = "str"  # str, int, float, bool, path, list, env
    choices: tuple[str, ...] | None = None
    metavar: str | None = None


_OPTIONS = (
    _Option("sidecar_image", "image of the injected sidecar (required)", metavar="IMAGE"),
    _Option("redis_url", "the sidecars' Redis URL, set as a literal env value", metavar="URL"),
    _Option("redis_url_secret", "NAME[:KEY] of a Secret (in each pod's namespace) holding the URL; key redis-url"),
    _Option("redis_cluster", "the Redis URL is a Redis Cluster seed node", "bool"),
    _Option("policy_configmap", "ConfigMap (in each pod's namespace) with the policy; '' for the built-in policy"),
    _Option("policy_key", "the policy file's key in that ConfigMap"),
    _Option("inject_all", "on /mutate, inject every pod that does not opt out (for label-selected namespaces)", "bool"),
    _Option("legacy_sidecar", "inject a regular container instead of a native sidecar (clusters before 1.29)", "bool"),
    _Option(
        "tenant_source",
        "annotation: budgetwarden.io/tenant, else --default-tenant, else the namespace; "
        "namespace: always the pod's namespace",
        choices=("annotation", "namespace"),
    ),
    _Option("default_tenant", "tenant of pods without budgetwarden.io/tenant (empty: the pod's namespace)"),
    _Option("namespace", "the webhook's own namespace, never injected (unset: env POD_NAMESPACE, else budgetwarden)"),
    _Option("skip_namespaces", "comma-separated namespaces never injected", "list"),
    _Option("listen", "host:port the HTTPS server listens on"),
    _Option("tls_cert_file", "serving certificate (PEM), reloaded when it changes", "path"),
    _Option("tls_key_file", "its private key (PEM)", "path"),
    _Option("cert_reload_seconds", "how often the certificate files are checked for changes", "float"),
    _Option("self_signed", "generate a CA and a serving certificate at start instead of reading files", "bool"),
    _Option("self_signed_dir", "keep the self-signed CA (ca.crt, ca.key) here, so it survives restarts", "path"),
    _Option("service_name", "the webhook Service's name (for the self-signed certificate's DNS names)"),
    _Option("dns_names", "comma-separated extra DNS names or IPs for the self-signed certificate", "list"),
    _Option("sidecar_image_pull_policy", "imagePullPolicy of the sidecar", choices=("Always", "IfNotPresent", "Never")),
    _Option("sidecar_fail_mode", "default fail mode (annotation budgetwarden.io/fail-mode)", choices=_FAIL_MODES),
    _Option("sidecar_log_level", "default sidecar log level (annotation budgetwarden.io/log-level)"),
    _Option("sidecar_cpu_request", "default CPU request (annotation budgetwarden.io/cpu)"),
    _Option("sidecar_cpu_limit", "default CPU limit, 'none' for none (annotation budgetwarden.io/cpu-limit)"),
    _Option("sidecar_memory_request", "default memory request (annotation budgetwarden.io/memory)"),
    _Option("sidecar_memory_limit", "default memory limit, 'none' for none (annotation budgetwarden.io/memory-limit)"),
    _Option("sidecar_user", "uid (and gid) the sidecar runs as", "int"),
    _Option("sidecar_port", "loopback port of the budget API in the pod (BUDGETWARDEN_ADDR)", "int"),
    _Option(
        "sidecar_health_port", "port of the sidecar's grpc.health.v1 listener on the pod IP (kubelet probes)", "int"
    ),
    _Option("sidecar_metrics_port", "the sidecar's Prometheus port (0: none)", "int"),
    _Option(
        "sidecar_env",
        "extra sidecar env (OTEL_*), KEY=VALUE, repeatable; the variable takes a JSON object",
        "env",
        metavar="KEY=VALUE",
    ),
    _Option("shutdown_delay_seconds", "on SIGTERM, keep serving (not ready) this long before stopping", "float"),
    _Option("log_level", "the webhook's log level", choices=_LOG_LEVELS),
    _Option("log_format", "json or text", choices=("json", "text")),
)


_METAVARS = {
    "redis_url_secret": "NAME[:KEY]",
    "policy_configmap": "NAME",
    "policy_key": "KEY",
    "tenant_source": "SOURCE",
    "default_tenant": "TENANT",
    "namespace": "NAMESPACE",
    "skip_namespaces": "NS,NS",
    "listen": "HOST:PORT",
    "tls_cert_file": "FILE",
    "tls_key_file": "FILE",
    "cert_reload_seconds": "SECONDS",
    "self_signed_dir": "DIR",
    "service_name": "NAME",
    "dns_names": "NAME,NAME",
    "sidecar_image_pull_policy": "POLICY",
    "sidecar_fail_mode": "MODE",
    "sidecar_log_level": "LEVEL",
    "sidecar_cpu_request": "QUANTITY",
    "sidecar_cpu_limit": "QUANTITY",
    "sidecar_memory_request": "QUANTITY",
    "sidecar_memory_limit": "QUANTITY",
    "sidecar_user": "UID",
    "sidecar_port": "PORT",
    "sidecar_health_port": "PORT",
    "sidecar_metrics_port": "PORT",
    "shutdown_delay_seconds": "SECONDS",
    "log_level": "LEVEL",
    "log_format": "FORMAT",
}


def _env_name(name: str) -> str:
    return "BUDGETWARDEN_INJECT_" + name.upper()


def _default_text(name: str) -> str:
    value = {f.name: f.default for f in fields(InjectConfig)}[name]
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) if value and isinstance(value[0], str) else "none"
    if value in ("", None):
        return "unset"
    return str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``budgetwarden inject-webhook``; each has a BUDGETWARDEN_INJECT_* environment variable."""
    for opt in _OPTIONS:
        flag = "--" + opt.name.replace("_", "-")
        help_text = f"{opt.help} [env {_env_name(opt.name)}; default {_default_text(opt.name)}]"
        if opt.kind == "bool":
            parser.add_argument(
                flag, dest=opt.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif opt.kind == "env":
            parser.add_argument(flag, dest=opt.name, action="append", default=None, metavar=opt.metavar, help=help_text)
        else:
            metavar = opt.metavar or _METAVARS.get(opt.name)
            parser.add_argument(flag, dest=opt.name, default=None, metavar=metavar, help=help_text)
    parser.add_argument(
        "--print-ca-bundle",
        action="store_true",
        help="with --self-signed and --self-signed-dir: create the CA if needed, print its base64 PEM "
        "(the MutatingWebhookConfiguration's caBundle) and exit",
    )


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE or lowered == "":
        return False
    raise ValueError(f"{text!r} is not true or false")


def _convert(opt: _Option, value: Any, from_env: bool) -> Any:
    if opt.kind == "bool":
        return value if isinstance(value, bool) else _bool(value)
    if opt.kind == "int":
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a whole number") from None
    if opt.kind == "float":
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
    if opt.kind == "path":
        return Path(value) if value else None
    if opt.kind == "list":
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if opt.kind == "env":
        if from_env:
            try:
                data = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError:
                raise ValueError('expected a JSON object like {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://..."}') from None
            if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
                raise ValueError("expected a JSON object of strings")
            return tuple((str(k), v) for k, v in data.items())
        pairs = []
        for item in value:
            key, sep, val = item.partition("=")
            if not sep or not key:
                raise ValueError(f"{item!r}: expected KEY=VALUE")
            pairs.append((key, val))
        return tuple(pairs)
    if opt.choices is not None and value not in opt.choices and value.upper() not in opt.choices:
        raise ValueError(f"{value!r}: expected one of {', '.join(opt.choices)}")
    return value


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> InjectConfig:
    """Flags (non-None) win over BUDGETWARDEN_INJECT_* variables, which win over the defaults; then validated."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for opt in _OPTIONS:
        flag_value = getattr(args, opt.name, None)
        env_name = _env_name(opt.name)
        try:
            if flag_value is not None:
                values[opt.name] = _convert(opt, flag_value, from_env=False)
            elif env_name in env:
                values[opt.name] = _convert(opt, env[env_name], from_env=True)
        except ValueError as exc:
            where = f"--{opt.name.replace('_', '-')}" if flag_value is not None else env_name
            raise InjectConfigError(f"{where}: {exc}") from None
    if "namespace" not in values and env.get("POD_NAMESPACE"):
        values["namespace"] = env["POD_NAMESPACE"]
    if values.get("tls_cert_file", 0) is None or values.get("tls_key_file", 0) is None:
        raise InjectConfigError("--tls-cert-file and --tls-key-file must not be empty")
    return InjectConfig(**values).validate()


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{listen!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


# --------------------------------------------------------------------------------------------------------------------
# Values of annotations.


def _ident(value: str, max_bytes: int = 256) -> str:
    """The server's rule for ids: present, at most 256 bytes of UTF-8, no control characters."""
    if not value:
        raise ValueError("must not be empty")
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ValueError(f"is longer than {max_bytes} bytes")
    if any(ch < " " or ch == "\x7f" for ch in value):
        raise ValueError("contains control characters")
    return value


def _quantity(text: str, *, allow_none: bool = False) -> Decimal | None:
    """A Kubernetes resource quantity (``250m``, ``1.5``, ``128Mi``, ``1e3``), as a number; ``none`` when allowed."""
    if allow_none and text.strip().lower() == "none":
        return None
    match = _QUANTITY.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a resource quantity (like 100m, 0.5, 128Mi or 1Gi)")
    suffix = match.group("suffix") or ""
    number = Decimal(match.group("number"))
    if suffix[:1] in ("e", "E"):
        return number * (Decimal(10) ** int(suffix[1:]))
    return number * _SUFFIX[suffix]


def _inject_flag(value: Any) -> bool | None:
    if not isinstance(value, str):
        return None
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(value)


@dataclass(frozen=True)
class PodSettings:
    tenant: str
    task_type: str
    fail_mode: str
    log_level: str
    cpu_request: str
    cpu_limit: str | None
    memory_request: str
    memory_limit: str | None


def _resources(
    annotations: Mapping[str, str], request_key: str, limit_key: str, default_request: str, default_limit: str
) -> tuple[str, str | None]:
    request = annotations.get(request_key, default_request).strip()
    limit_text = annotations.get(limit_key, default_limit).strip()
    try:
        request_value = _quantity(request)
    except ValueError as exc:
        raise AnnotationError(f"{request_key}: {exc}") from None
    try:
        limit_value = _quantity(limit_text, allow_none=True)
    except ValueError as exc:
        raise AnnotationError(f"{limit_key}: {exc}") from None
    assert request_value is not None
    if limit_value is not None and request_value > limit_value:
        if request_key in annotations:
            raise AnnotationError(f"{request_key}: {request} is more than the limit {limit_text} ({limit_key})")
        request = limit_text  # only the limit was lowered: the request follows it, as Kubernetes defaults it
    return request, (None if limit_value is None else limit_text)


def pod_settings(config: InjectConfig, annotations: Mapping[str, str], namespace: str) -> PodSettings:
    """What the pod's annotations ask for, over the webhook's defaults; AnnotationError names a bad one."""
    tenant_annotation = annotations.get(TENANT)
    if config.tenant_source == "namespace":
        if tenant_annotation is not None and tenant_annotation != namespace:
            raise AnnotationError(
                f"{TENANT}: {tenant_annotation!r} is not allowed: this injector binds every pod to its namespace "
                f"({namespace!r}); remove the annotation"
            )
        tenant = namespace
    else:
        tenant = tenant_annotation if tenant_annotation is not None else (config.default_tenant or namespace)
    try:
        _ident(tenant)
    except ValueError as exc:
        raise AnnotationError(f"{TENANT}: {exc}") from None
    task_type = annotations.get(TASK_TYPE, "")
    if task_type:
        try:
            _ident(task_type)
        except ValueError as exc:
            raise AnnotationError(f"{TASK_TYPE}: {exc}") from None
    fail_mode = annotations.get(FAIL_MODE, config.sidecar_fail_mode).strip().lower()
    if fail_mode not in _FAIL_MODES:
        raise AnnotationError(f"{FAIL_MODE}: {annotations[FAIL_MODE]!r} is not open or closed")
    log_level = annotations.get(LOG_LEVEL, config.sidecar_log_level).strip().upper()
    if log_level not in _LOG_LEVELS:
        raise AnnotationError(f"{LOG_LEVEL}: {annotations[LOG_LEVEL]!r} is not DEBUG, INFO, WARNING or ERROR")
    cpu_request, cpu_limit = _resources(
        annotations, CPU, CPU_LIMIT, config.sidecar_cpu_request, config.sidecar_cpu_limit
    )
    memory_request, memory_limit = _resources(
        annotations, MEMORY, MEMORY_LIMIT, config.sidecar_memory_request, config.sidecar_memory_limit
    )
    return PodSettings(tenant, task_type, fail_mode, log_level, cpu_request, cpu_limit, memory_request, memory_limit)


# --------------------------------------------------------------------------------------------------------------------
# The patch.


def pointer(*parts: str | int) -> str:
    """A JSON pointer (RFC 6901): ``~`` becomes ``~0`` and ``/`` becomes ``~1`` in each part."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def sidecar_container(config: InjectConfig, settings: PodSettings) -> dict[str, Any]:
    """The budgetwarden container: budget API on loopback, grpc.health.v1 on the pod IP for the kubelet's probes."""
    args = [
        "serve",
        "--listen",
        f"127.0.0.1:{config.sidecar_port}",
        "--health-listen",
        f"0.0.0.0:{config.sidecar_health_port}",
        "--fail-mode",
        settings.fail_mode,
        "--log-level",
        settings.log_level,
    ]
    if config.policy_configmap:
        args += ["--policy-file", f"{POLICY_MOUNT}/{config.policy_key}"]
    if config.sidecar_metrics_port:
        args += ["--metrics-port", str(config.sidecar_metrics_port)]
    env: list[dict[str, Any]] = [{"name": "BUDGETWARDEN_TENANT", "value": settings.tenant}]
    if settings.task_type:
        env.append({"name": "BUDGETWARDEN_DEFAULT_TASK_TYPE", "value": settings.task_type})
    # The URL travels in the environment, never in args: it may carry a password, and args show in `ps`.
    if config.redis_url_secret:
        name, key = config.redis_secret_ref
        env.append({"name": "BUDGETWARDEN_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": name, "key": key}}})
    else:
        env.append({"name": "BUDGETWARDEN_REDIS_URL", "value": config.redis_url})
    if config.redis_cluster:
        env.append({"name": "BUDGETWARDEN_REDIS_CLUSTER", "value": "true"})
    for name, path in (
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_UID", "metadata.uid"),
        ("NODE_NAME", "spec.nodeName"),
    ):
        env.append({"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}})
    env += [{"name": name, "value": value} for name, value in config.sidecar_env]
    requests = {"cpu": settings.cpu_request, "memory": settings.memory_request}
    limits = {name: value for name, value in (("cpu", settings.cpu_limit), ("memory", settings.memory_limit)) if value}
    resources: dict[str, Any] = {"requests": requests}
    if limits:
        resources["limits"] = limits

    def probe(period: int, failures: int) -> dict[str, Any]:
        return {
            "grpc": {"port": config.sidecar_health_port},
            "periodSeconds": period,
            "timeoutSeconds": 1,
            "failureThreshold": failures,
        }

    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": config.sidecar_image,
        "imagePullPolicy": config.sidecar_image_pull_policy,
        "command": ["budgetwarden"],
        "args": args,
        "env": env,
        "resources": resources,
        # Up to a minute to become ready; with a native sidecar the app containers start only once this passes.
        "startupProbe": probe(1, 60),
        "readinessProbe": probe(5, 3),
        "livenessProbe": probe(10, 3),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": config.sidecar_user,
            "runAsGroup": config.sidecar_user,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if config.policy_configmap:
        container["volumeMounts"] = [{"name": POLICY_VOLUME, "mountPath": POLICY_MOUNT, "readOnly": True}]
    if not config.legacy_sidecar:
        # A native sidecar (Kubernetes 1.29+): started before the app containers, stopped after them.
        container["restartPolicy"] = "Always"
    return container


def _addr_ops(config: InjectConfig, containers: Sequence[Any]) -> list[dict[str, Any]]:
    """BUDGETWARDEN_ADDR for every app container that has no such variable yet."""
    ops: list[dict[str, Any]] = []
    entry = {"name": ADDR_ENV, "value": f"127.0.0.1:{config.sidecar_port}"}
    for i, container in enumerate(containers):
        if not isinstance(container, dict) or container.get("name") == SIDECAR_NAME:
            continue
        env = container.get("env")
        if isinstance(env, list):
            if any(isinstance(e, dict) and e.get("name") == ADDR_ENV for e in env):
                continue
            ops.append({"op": "add", "path": pointer("spec", "containers", i, "env", "-"), "value": entry})
        else:
            ops.append({"op": "add", "path": pointer("spec", "containers", i, "env"), "value": [entry]})
    return ops


def _append(ops: list[dict[str, Any]], parent: Mapping[str, Any], parts: tuple[str, ...], value: Any) -> None:
    """Append to the list at ``parts``: ``add .../-`` when it exists, else ``add`` the whole list."""
    if isinstance(parent.get(parts[-1]), list):
        ops.append({"op": "add", "path": pointer(*parts, "-"), "value": value})
    else:
        ops.append({"op": "add", "path": pointer(*parts), "value": [value]})


def injection_patch(config: InjectConfig, pod: Mapping[str, Any], settings: PodSettings) -> list[dict[str, Any]]:
    """The JSONPatch that injects the sidecar into a pod that has none."""
    ops: list[dict[str, Any]] = []
    metadata = pod.get("metadata")
    if not isinstance(metadata, dict):
        value = {"annotations": {STATUS: STATUS_INJECTED}, "labels": {SIDECAR_LABEL: STATUS_INJECTED}}
        ops.append({"op": "add", "path": "/metadata", "value": value})
    else:
        for field, key in (("annotations", STATUS), ("labels", SIDECAR_LABEL)):
            if not isinstance(metadata.get(field), dict):
                ops.append({"op": "add", "path": f"/metadata/{field}", "value": {key: STATUS_INJECTED}})
            else:
                ops.append({"op": "add", "path": pointer("metadata", field, key), "value": STATUS_INJECTED})
    spec = pod["spec"]
    if config.policy_configmap:
        volumes = spec.get("volumes")
        taken = isinstance(volumes, list) and any(
            isinstance(v, dict) and v.get("name") == POLICY_VOLUME for v in volumes
        )
        # A volume of that name already in the pod is the pod's own choice of policy source: it is mounted as is.
        if not taken:
            volume = {
                "name": POLICY_VOLUME,
                "configMap": {"name": config.policy_configmap, "defaultMode": 0o444},
            }
            _append(ops, spec, ("spec", "volumes"), volume)
    container = sidecar_container(config, settings)
    containers = spec["containers"]
    ops += _addr_ops(config, containers)  # before the sidecar is appended, so the indices hold
    if config.legacy_sidecar:
        ops.append({"op": "add", "path": "/spec/containers/-", "value": container})
    else:
        # Last of the init containers: earlier init containers and sidecars (a service mesh's proxy) run first, and
        # the app containers start only once its startup probe passes. Native sidecars stop in reverse order, after
        # every app container has exited, so the agent's last usage reports still reach it.
        _append(ops, spec, ("spec", "initContainers"), container)
    return ops


# --------------------------------------------------------------------------------------------------------------------
# Admission.


class BadReviewError(ValueError):
    """A body that cannot be answered with an AdmissionReview: HTTP 400."""


@dataclass
class Outcome:
    result: str  # injected, updated, skipped, denied
    message: str
    patch: list[dict[str, Any]]
    warnings: list[str]


def _skip(message: str, *warnings: str) -> Outcome:
    return Outcome("skipped", message, [], list(warnings))


def _pod_label(pod: Mapping[str, Any], namespace: str) -> str:
    metadata = pod.get("metadata") if isinstance(pod.get("metadata"), dict) else {}
    assert isinstance(metadata, dict)
    name = metadata.get("name") or (str(metadata.get("generateName") or "") + "*")
    return f"{namespace}/{name}"


class Injector:
    """Turns AdmissionReviews into answers; pure, thread-safe, never raises for anything a client can send."""

    def __init__(self, config: InjectConfig) -> None:
        self.config = config
        self.excluded = frozenset({config.namespace, *config.skip_namespaces})

    def handle(self, body: bytes, inject_all: bool) -> tuple[int, bytes, str]:
        """(HTTP status, body, content type) for a POST body."""
        try:
            request = parse_review(body)
        except BadReviewError as exc:
            log.warning("bad admission review: %s", exc, extra={"problem": str(exc)})
            return 400, (str(exc) + "\n").encode(), "text/plain; charset=utf-8"
        uid = request["uid"]
        outcome = self.mutate(request, inject_all or self.config.inject_all)
        response: dict[str, Any] = {"uid": uid, "allowed": outcome.result != "denied"}
        if outcome.result == "denied":
            response["status"] = {
                "metadata": {},
                "status": "Failure",
                "message": outcome.message,
                "reason": "BadRequest",
                "code": 400,
            }
        else:
            response["status"] = {"metadata": {}, "status": "Success", "message": outcome.message, "code": 200}
        if outcome.patch:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(outcome.patch, separators=(",", ":")).encode()).decode()
        if outcome.warnings:
            response["warnings"] = outcome.warnings
        review = {"apiVersion": ADMISSION_API_VERSION, "kind": "AdmissionReview", "response": response}
        obj = request.get("object")
        namespace = str(request.get("namespace") or "")
        extra = {
            "uid": uid,
            "pod": _pod_label(obj, namespace) if isinstance(obj, dict) else namespace,
            "result": outcome.result,
            "reason": outcome.message,
        }
        level = logging.DEBUG if outcome.result == "skipped" and not outcome.warnings else logging.INFO
        log.log(level, "admission %s %s: %s", outcome.result, extra["pod"], outcome.message, extra=extra)
        return 200, json.dumps(review, separators=(",", ":")).encode(), "application/json"

    def mutate(self, request: Mapping[str, Any], inject_all: bool) -> Outcome:
        resource = request.get("resource")
        if not isinstance(resource, dict) or resource.get("group", "") != "" or resource.get("resource") != "pods":
            what = json.dumps(resource, separators=(",", ":")) if resource is not None else "missing"
            return _skip(
                f"not a pod (request.resource {what[:120]}): nothing to inject",
                "budgetwarden injector: called for something other than pods; check the webhook's rules",
            )
        if request.get("subResource"):
            return _skip(f"subresource {str(request['subResource'])[:60]!r}: nothing to inject")
        operation = request.get("operation")
        if operation != "CREATE":
            return _skip(
                f"operation {str(operation)[:20]!r}: only CREATE is injected",
                "budgetwarden injector: called for an operation other than CREATE; check the webhook's rules",
            )
        pod = request.get("object")
        if not isinstance(pod, dict):
            return _skip(
                "request.object is missing or not a pod: nothing to inject",
                "budgetwarden injector: the admission request carried no pod",
            )
        metadata = pod.get("metadata", {})
        spec = pod.get("spec")
        if not isinstance(metadata, dict) or not isinstance(spec, dict) or not isinstance(spec.get("containers"), list):
            return _skip("the pod has no metadata or spec.containers: nothing to inject")
        namespace = str(request.get("namespace") or metadata.get("namespace") or "default")
        annotations = metadata.get("annotations") if isinstance(metadata.get("annotations"), dict) else {}
        labels = metadata.get("labels") if isinstance(metadata.get("labels"), dict) else {}
        assert isinstance(annotations, dict)
        assert isinstance(labels, dict)
        if namespace in self.excluded:
            return _skip(f"namespace {namespace!r} is never injected")
        warnings: list[str] = []
        wanted = self._wanted(annotations, labels, inject_all, warnings)
        if not wanted:
            return Outcome("skipped", wanted.reason, [], warnings)
        if spec.get("hostNetwork") is True:
            return _skip(
                "hostNetwork pods are not injected (the sidecar's ports would be the node's)",
                f"budgetwarden: {INJECT} ignored: hostNetwork pods are not injected",
            )
        names = {
            c.get("name")
            for key in ("initContainers", "containers")
            if isinstance(spec.get(key), list)
            for c in spec[key]
            if isinstance(c, dict)
        }
        injected = annotations.get(STATUS) == STATUS_INJECTED
        if SIDECAR_NAME in names:
            if not injected:
                return _skip(
                    f"the pod already has a container named {SIDECAR_NAME!r}: not injected",
                    f"budgetwarden: the pod already has a container named {SIDECAR_NAME!r}; not injected",
                )
            # Reinvocation (reinvocationPolicy: IfNeeded): a later webhook may have added containers since.
            ops = _addr_ops(self.config, spec["containers"])
            if ops:
                return Outcome("updated", f"already injected; {ADDR_ENV} added to new containers", ops, warnings)
            return Outcome("skipped", "already injected", [], warnings)
        if STATUS in annotations:
            return _skip(
                f"{STATUS} is set but the pod has no {SIDECAR_NAME!r} container: not injected",
                f"budgetwarden: {STATUS} is set but there is no sidecar; remove the annotation to inject",
            )
        unknown = sorted(
            k for k in annotations if isinstance(k, str) and k.startswith(PREFIX) and k not in KNOWN_ANNOTATIONS
        )
        if unknown:
            warnings.append(f"budgetwarden: unknown annotation(s) ignored: {', '.join(unknown)[:180]}")
        try:
            settings = pod_settings(self.config, {str(k): str(v) for k, v in annotations.items()}, namespace)
        except AnnotationError as exc:
            return Outcome("denied", f"budgetwarden sidecar injection: {exc}", [], warnings)
        patch = injection_patch(self.config, pod, settings)
        where = "a regular container" if self.config.legacy_sidecar else "a native sidecar"
        return Outcome("injected", f"injected as {where} for tenant {settings.tenant!r}", patch, warnings)

    @staticmethod
    def _wanted(
        annotations: Mapping[Any, Any], labels: Mapping[Any, Any], inject_all: bool, warnings: list[str]
    ) -> _Wanted:
        choices: list[bool] = []
        for where, source in (("annotation", annotations), ("label", labels)):
            if INJECT not in source:
                continue
            try:
                choice = _inject_flag(source[INJECT])
            except ValueError:
                warnings.append(f"budgetwarden: {where} {INJECT}={str(source[INJECT])[:40]!r} is not true or false")
                continue
            if choice is not None:
                choices.append(choice)
        if False in choices:
            return _Wanted(False, "the pod opted out")
        if True in choices:
            return _Wanted(True, "the pod opted in")
        if inject_all:
            return _Wanted(True, "injected unless opted out")
        return _Wanted(False, f'not requested (no {INJECT}: "true")')


@dataclass(frozen=True)
class _Wanted:
    yes: bool
    reason: str

    def __bool__(self) -> bool:
        return self.yes


def parse_review(body: bytes) -> dict[str, Any]:
    """The ``request`` of an AdmissionReview, or BadReviewError saying what is wrong."""
    try:
        review = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadReviewError(f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise BadReviewError("the body is not JSON: nested too deeply") from None
    if not isinstance(review, dict):
        raise BadReviewError(f"expected an AdmissionReview object, got a JSON {type(review).__name__}")
    api_version, kind = review.get("apiVersion"), review.get("kind")
    if kind != "AdmissionReview":
        got = "no kind" if kind is None else f"kind {str(kind)[:60]!r}"
        raise BadReviewError(f"expected an AdmissionReview ({ADMISSION_API_VERSION}), got {got}")
    if api_version != ADMISSION_API_VERSION:
        got = "no apiVersion" if api_version is None else f"apiVersion {str(api_version)[:60]!r}"
        raise BadReviewError(
            f"expected apiVersion {ADMISSION_API_VERSION}, got {got} "
            "(set admissionReviewVersions: [v1] in the MutatingWebhookConfiguration)"
        )
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReviewError("the AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReviewError("the AdmissionReview's request has no uid")
    return request


# --------------------------------------------------------------------------------------------------------------------
# Certificates.


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


def generate_ca(common_name: str = "budgetwarden-injector-ca", days: int = 3650) -> tuple[bytes, bytes]:
    """A new CA (ECDSA P-256): (certificate PEM, key PEM)."""
    x509 = _crypto()
    from cryptography.hazmat.primitives import hashes, serialization
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
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


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
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


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


# --------------------------------------------------------------------------------------------------------------------
# The HTTPS server.

ROUTES = {"/mutate": False, "/mutate-all": True}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], webhook: WebhookServer) -> None:
        self.webhook = webhook
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._lock = threading.Lock()
        self.connections: set[Any] = set()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look up the host's FQDN, which can stall where DNS is slow or absent.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        with contextlib.suppress(OSError):  # headers and body are separate writes: no Nagle delay between them
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The context current at accept time: after a reload, new connections get the new certificate. The
        # handshake runs in the connection's thread, so a slow client never blocks the accept loop.
        try:
            tls = self.webhook.certificates.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError):
            sock.close()
            raise OSError("TLS wrap failed") from None
        return tls, addr

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self._slots.acquire(blocking=False):
            return True
        log.warning("too many connections; one refused", extra={"limit": MAX_CONNECTIONS})
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self.connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self.connections.discard(request)
            self._slots.release()

    def close_connections(self) -> None:
        """Ends every open connection (idle keep-alive ones would otherwise wait for their timeout)."""
        with self._lock:
            open_now = list(self.connections)
        for conn in open_now:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, ssl.SSLError, TimeoutError, ConnectionError)):
            log.debug("connection ended", extra={"client": str(client_address), "error": str(exc)})
        else:
            log.error("unexpected error on a connection", exc_info=True, extra={"client": str(client_address)})


class _Counter:
    def __init__(self) -> None:
        self._value = 0
        self._cond = threading.Condition()

    def add(self, delta: int) -> None:
        with self._cond:
            self._value += delta
            self._cond.notify_all()

    def wait_zero(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._value <= 0, timeout)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "budgetwarden-injector"
    sys_version = ""
    timeout = IDLE_TIMEOUT_S
    server: _Server

    def setup(self) -> None:
        self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format % args, extra={"client": self.client_address[0]})

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self.close_connection = True  # the body (if any) was not read: the connection cannot be reused
        self._reply(status, (message + "\n").encode())

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/healthz":
            self._reply(200, b"ok\n")
        elif path == "/readyz":
            ready = self.server.webhook.ready
            self._reply(200 if ready else 503, b"ok\n" if ready else b"not ready\n")
        elif path in ROUTES:
            self._error(405, f"{path} takes POST with an AdmissionReview")
        else:
            self._error(404, f"no such path {path[:100]!r}: POST /mutate or /mutate-all; GET /healthz or /readyz")

    def do_POST(self) -> None:
        path = urlsplit(self.path).path  # the API server appends ?timeout=10s
        if path not in ROUTES:
            self._error(404, f"no such path {path[:100]!r}: POST /mutate or /mutate-all")
            return
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._error(411, "send the body with a Content-Length")
            return
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self._error(411, "send the body with a Content-Length")
            return
        try:
            length = int(length_text)
        except ValueError:
            length = -1
        if length < 0:
            self._error(400, f"bad Content-Length {length_text[:30]!r}")
            return
        if length > MAX_BODY_BYTES:
            self._error(413, f"the body is {length} bytes; at most {MAX_BODY_BYTES} are accepted")
            return
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            return
        webhook = self.server.webhook
        webhook.inflight.add(1)
        try:
            try:
                status, payload, content_type = webhook.injector.handle(body, ROUTES[path])
            except Exception:
                log.exception("admission review failed")
                self._error(500, "internal error while handling the AdmissionReview (see the webhook's log)")
                return
            if not webhook.accepting:
                self.close_connection = True  # stopping: answer this one, then let the client reconnect elsewhere
            self._reply(status, payload, content_type)
        finally:
            webhook.inflight.add(-1)


class WebhookServer:
    """The webhook: HTTPS on ``config.listen``, answering from threads; certificates polled for changes."""

    def __init__(self, config: InjectConfig, certificates: CertificateSource | None = None) -> None:
        self.config = config
        self.injector = Injector(config)
        self.certificates = certificates if certificates is not None else certificate_source(config)
        self.inflight = _Counter()
        self.ready = False
        self.accepting = True
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        host, port = parse_listen(config.listen)
        try:
            self._httpd = _Server((host, port), self)
        except OSError as exc:
            raise InjectError(f"cannot listen on {config.listen}: {exc.strerror or exc}") from None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> WebhookServer:
        serve = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="inject-https", daemon=True
        )
        watch = threading.Thread(target=self._watch_certificates, name="inject-certs", daemon=True)
        self._threads = [serve, watch]
        for thread in self._threads:
            thread.start()
        self.ready = True
        extra: dict[str, Any] = {
            "listen": self.config.listen,
            "port": self.port,
            "sidecar": "legacy container" if self.config.legacy_sidecar else "native sidecar",
            "inject_all": self.config.inject_all,
            "sha256": getattr(self.certificates, "fingerprint", "?"),
        }
        if isinstance(self.certificates, SelfSignedCertificate):
            extra["ca_bundle"] = self.certificates.ca_bundle
            extra["dns_names"] = list(self.certificates.dns_names)
        log.info("injector serving on %s (port %d)", self.config.listen, self.port, extra=extra)
        if isinstance(self.certificates, SelfSignedCertificate):
            log.info("self-signed CA, the MutatingWebhookConfiguration's caBundle: %s", self.certificates.ca_bundle)
        return self

    def _watch_certificates(self) -> None:
        while not self._stopping.wait(self.config.cert_reload_seconds):
            try:
                self.certificates.poll()
            except Exception:
                log.exception("certificate check failed; the loaded certificate stays")

    def stop(self, delay: float = 0.0, grace: float = 10.0) -> None:
        """Not ready at once; keep serving ``delay`` seconds (endpoints to update); then stop accepting and let
        in-flight reviews finish within ``grace``."""
        self.ready = False
        if delay > 0:
            self._stopping.wait(delay)
        self._stopping.set()
        self.accepting = False
        self._httpd.shutdown()
        self._httpd.server_close()
        self.inflight.wait_zero(grace)
        self._httpd.close_connections()
        for thread in self._threads:
            thread.join(grace)
        log.info("injector stopped")


def run(config: InjectConfig) -> None:
    """Serve until SIGTERM (after --shutdown-delay-seconds) or SIGINT (at once)."""
    server = WebhookServer(config).start()
    stop = threading.Event()
    delay = {"value": 0.0}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        delay["value"] = config.shutdown_delay_seconds if signum == signal.SIGTERM else 0.0
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(3600):
        pass
    log.info("stopping", extra={"delay_seconds": delay["value"]})
    server.stop(delay["value"])
