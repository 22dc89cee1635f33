"""The injector's configuration: flags over BUDGETWARDEN_INJECT_* environment variables over defaults."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ._exceptions import InjectConfigError
from ._values import (
    _CONFIGMAP_KEY,
    _DNS_LABEL,
    _DNS_SUBDOMAIN,
    _ENV_NAME,
    _FAIL_MODES,
    _FALSE,
    _LOG_LEVELS,
    _TRUE,
    RESERVED_SIDECAR_ENV,
    _ident,
    _quantity,
)

# The Secret (NAME:KEY, in each pod's namespace) the sidecars read the Redis URL from when neither --redis-url nor
# --redis-url-secret is given.
DEFAULT_REDIS_SECRET = "budgetwarden-redis:redis-url"


@dataclass(frozen=True, kw_only=True)
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
    # Secure by default: a pod author can set annotations, not the namespace the cluster admin gave them.
    tenant_source: str = "namespace"
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
    check_namespace_objects: bool = False
    patch_webhook_ca: str = ""
    kube_api: str = ""
    kube_token_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    kube_ca_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")

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
        # The webhook itself never connects to Redis: without either flag, the sidecars read the URL from the
        # conventional Secret in their own namespace (which --check-namespace-objects then checks for).
        redis_url_secret = self.redis_url_secret or ("" if self.redis_url else DEFAULT_REDIS_SECRET)
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
        if self.patch_webhook_ca:
            if not self.self_signed:
                raise bad("--patch-webhook-ca", "needs --self-signed (with cert-manager, its CA injector writes it)")
            if not _DNS_SUBDOMAIN.match(self.patch_webhook_ca):
                raise bad("--patch-webhook-ca", f"{self.patch_webhook_ca!r} is not a MutatingWebhookConfiguration name")
        if self.kube_api and not self.kube_api.startswith("https://"):
            raise bad("--kube-api", f"{self.kube_api!r}: expected https://HOST[:PORT]")
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
        return replace(
            self,
            redis_url_secret=redis_url_secret,
            sidecar_log_level=self.sidecar_log_level.upper(),
            log_level=self.log_level.upper(),
        )


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
    _Option(
        "redis_url_secret",
        "NAME[:KEY] of a Secret (in each pod's namespace) holding the URL; key redis-url; with neither flag: "
        + DEFAULT_REDIS_SECRET,
    ),
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
    _Option(
        "check_namespace_objects",
        "refuse a pod whose namespace lacks the policy ConfigMap (or the --redis-url-secret Secret) its sidecar "
        "mounts, naming what is missing (reads them through the Kubernetes API)",
        "bool",
    ),
    _Option(
        "patch_webhook_ca",
        "with --self-signed: keep the caBundle of this MutatingWebhookConfiguration equal to the CA (Kubernetes API)",
        metavar="NAME",
    ),
    _Option("kube_api", "the Kubernetes API server (unset: in-cluster, KUBERNETES_SERVICE_HOST)", metavar="URL"),
    _Option("kube_token_file", "bearer token for the API server (re-read on every call)", "path", metavar="FILE"),
    _Option("kube_ca_file", "CA that signed the API server's certificate", "path", metavar="FILE"),
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
