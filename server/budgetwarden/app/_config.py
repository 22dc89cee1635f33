"""Configuration: command-line flags over ``BUDGETWARDEN_*`` environment variables over a YAML config file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

REDIS_URL_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")


def split_list(text: str) -> list[str]:
    """A comma-separated setting's items, without blanks."""
    return [part.strip() for part in text.split(",") if part.strip()]


class Settings(BaseSettings):
    """Every setting is a flag of ``budgetwarden serve`` (``--redis-url``) and an environment variable
    (``BUDGETWARDEN_REDIS_URL``); the README's configuration table lists them all."""

    model_config = SettingsConfigDict(env_prefix="BUDGETWARDEN_", extra="forbid", frozen=True)

    listen: str = Field("127.0.0.1:50151", description="host:port the budget API listens on")
    health_listen: str | None = Field(
        None,
        description="extra host:port serving only grpc.health.v1 (for kubelet probes on the pod IP); unset: none",
    )
    tenant: str | None = Field(
        None,
        description="bind this sidecar to one tenant: empty tenant_id means it, any other is PERMISSION_DENIED",
    )
    default_task_type: str | None = Field(
        None, description="task type of checks that name none (before the policy's default_task_type)"
    )
    redis_url: str | None = Field(
        None, description="redis://, rediss:// or unix:// URL of Redis; unset: start the embedded server"
    )
    redis_cluster: bool = Field(False, description="treat redis_url as a Redis Cluster seed node")
    data_dir: Path = Field(Path(".budgetwarden"), description="where the embedded server keeps its data")
    # --- Redis credentials and TLS (a rediss:// URL) ----------------------------------------------------------------
    redis_username: str | None = Field(None, description="Redis ACL user; unset: the URL's user, else the default user")
    redis_password: SecretStr | None = Field(
        None, description="Redis password (from a Secret); unset: redis_password_file, else the URL's password"
    )
    redis_password_file: FilePath | None = Field(
        None,
        description="file holding the Redis password, read again for every new connection (a rotated Secret applies "
        "without a restart)",
    )
    redis_tls_ca_file: FilePath | None = Field(
        None, description="CA certificates that sign the Redis server's certificate (rediss://); unset: the system's"
    )
    redis_tls_cert_file: FilePath | None = Field(
        None, description="client certificate for Redis (mutual TLS, rediss://); with redis_tls_key_file"
    )
    redis_tls_key_file: FilePath | None = Field(None, description="private key of redis_tls_cert_file")
    # --- the store's health and durability -------------------------------------------------------------------------
    durability: Literal["none", "aof-local", "replicas"] | None = Field(
        None,
        description="when an acknowledged write is safe: aof-local (fsynced to the append-only file before the "
        "answer: the embedded server runs appendfsync always; an external Redis is asked WAITAOF 1 0), replicas "
        "(held by durability_replicas replicas before the answer: WAIT; survives a failover to one of them) or none "
        "(as the Redis is configured); unset: aof-local with the embedded server, none with --redis-url",
    )
    durability_replicas: Annotated[int, Field(ge=1, le=16)] = Field(
        1, description="with durability replicas: how many replicas must hold a write before it is acknowledged"
    )
    store_ping_interval_seconds: Annotated[float, Field(gt=0, le=60)] = Field(
        1.0, description="how often Redis is pinged for readiness (and the embedded server's process checked)"
    )
    store_ping_timeout_ms: Annotated[int, Field(ge=1, le=60_000)] = Field(
        500, description="how long a readiness ping waits for Redis before readiness turns NOT_SERVING"
    )
    policy_file: Path | None = Field(None, description="policy YAML file; unset: the built-in default policy")
    policy_reload_seconds: Annotated[float, Field(ge=0)] = Field(
        2.0, description="how often the policy file is checked for changes (0: only on SIGHUP)"
    )
    admin_listen: str | None = Field(
        None, description="host:port for BudgetAdminService (approvals, ceilings); unset: not served"
    )
    admin_tokens_file: FilePath | None = Field(
        None,
        description="YAML/JSON file of who may call the admin API: bearer tokens (as SHA-256) and client certificate "
        "names, each with a role (viewer, approver, admin) and tenants; read again when it changes. Unset: no "
        "credentials asked, and admin_listen must be a loopback address",
    )
    console_listen: str | None = Field(
        None,
        description="host:port for the web console (control plane only): open checkpoints to approve or deny, "
        "tenants' windows, recent admin actions; log in with a token of admin_tokens_file; TLS with tls_cert_file "
        "and tls_key_file when set. Unset: not served",
    )
    audit_stream_max_len: Annotated[int, Field(ge=1000)] = Field(
        100_000, description="audit entries kept per tenant stream, at most"
    )
    audit_stream_max_age_seconds: Annotated[int, Field(ge=60)] = Field(
        90 * 86400, description="audit entries older than this are trimmed from the stream"
    )
    # --- notifications (docs/operators.md#notifications) ------------------------------------------------------------
    notify_webhook_urls: str = Field(
        "",
        description="comma-separated URLs the control plane POSTs notifications to as CloudEvents (structured JSON), "
        "signed with notify_secret_file; unset: none",
    )
    notify_slack_urls: str = Field(
        "", description='comma-separated Slack-compatible incoming webhook URLs (a body of {"text": ...}); unset: none'
    )
    # A Path, not a FilePath: a deployment may name a file from an optional Secret that exists only where webhooks are
    # configured; the file must exist when notify_webhook_urls are set (checked below).
    notify_secret_file: Path | None = Field(
        None,
        description="file holding the HMAC-SHA256 key that signs webhook notifications (Standard Webhooks headers; "
        "a whsec_ key is base64), read again for every delivery; required with notify_webhook_urls (and only then "
        "must it exist)",
    )
    notify_fractions: str = Field(
        "0.8,1.0",
        description="comma-separated fractions (above 0, at most 1) of a tenant window's token or USD limit whose "
        "crossing is notified, once per window; empty: none. Read by the sidecars, which see the crossings",
    )
    notify_stream_max_len: Annotated[int, Field(ge=0)] = Field(
        10_000,
        description="notifications waiting for delivery per tenant, at most; more are dropped and counted "
        "(budgetwarden.notify.dropped); 0: no notifications are written",
    )
    notify_stream_max_age_seconds: Annotated[int, Field(ge=60)] = Field(
        7 * 86400, description="how long a tenant's undelivered notifications are kept after the last one"
    )
    notify_max_attempts: Annotated[int, Field(ge=1, le=100)] = Field(
        8, description="deliveries tried per notification and URL before it is given up (and counted)"
    )
    notify_backoff_initial_ms: Annotated[int, Field(ge=1, le=3_600_000)] = Field(
        500, description="wait before the first retry of a notification; doubled for each next one"
    )
    notify_backoff_max_ms: Annotated[int, Field(ge=1, le=3_600_000)] = Field(
        60_000, description="longest wait between two tries of a notification"
    )
    notify_timeout_ms: Annotated[int, Field(ge=1, le=600_000)] = Field(
        5000, description="how long one POST of a notification may take"
    )
    notify_source: str = Field(
        "/budgetwarden", min_length=1, description="the CloudEvents source attribute of the notifications"
    )
    tls_cert_file: FilePath | None = Field(
        None,
        description="certificate (chain) the budget and admin listeners serve TLS with, read again when it changes; "
        "unset: plaintext (fine on loopback in a pod)",
    )
    tls_key_file: FilePath | None = Field(None, description="private key of tls_cert_file")
    tls_client_ca_file: FilePath | None = Field(
        None,
        description="CA certificates that clients' certificates must chain to (mutual TLS); unset: no client "
        "certificate is asked for",
    )
    fail_mode: Literal["open", "closed"] = Field(
        "closed", description="answer when Redis does not answer in time: open (allow) or closed (deny)"
    )
    # Deadlines: how long each call may wait for the store, and what is kept back from the caller's own deadline.
    check_deadline_ms: Annotated[int, Field(ge=1, le=60_000)] = Field(
        250, description="how long a check waits for Redis before the fail mode answers"
    )
    store_deadline_ms: Annotated[int, Field(ge=1, le=60_000)] = Field(
        1000,
        description="how long a report, release, budget read or admin call waits for Redis before it answers "
        "UNAVAILABLE",
    )
    batch_unary_checks: bool = Field(
        True,
        description="concurrent unary checks (without a prompt) share store calls: those that arrive while one is out "
        "go together when it returns, one script call per tenant, each decided as alone (but it may wait for one store "
        "call more)",
    )
    lean_redis_client: bool = Field(
        True,
        description="send checks' script calls (check.lua) on one pipelined connection parsed by hiredis instead of "
        "redis-py's client, for less CPU per check; only with a single Redis (not a Cluster or Sentinel) and "
        "durability none, else redis-py is used; off: redis-py for every call",
    )
    deadline_margin_ms: Annotated[int, Field(ge=0, le=10_000)] = Field(
        40,
        description="kept back from a caller's deadline so the answer reaches it in time: this or 10% of it, whichever "
        "is more, but at most half",
    )
    # --- local allowance (docs/local-allowance.md): a prototype, off by default -------------------------------------
    local_allowance: bool = Field(
        False,
        description="decide checks of a task from a slice of its budget reserved in Redis (min(local_allowance_cap_"
        "tokens, local_allowance_share of what is left)), without a Redis call per check; unused slices are handed "
        "back when idle and on shutdown, and come back by their lease if the sidecar dies",
    )
    local_allowance_cap_tokens: Annotated[int, Field(ge=1, le=10**12)] = Field(
        50_000, description="with local_allowance: the largest slice of a task's budget one sidecar holds, in tokens"
    )
    local_allowance_share: Annotated[float, Field(gt=0, le=1)] = Field(
        0.1, description="with local_allowance: the share of what a task has left that one slice takes at most"
    )
    local_allowance_idle_ms: Annotated[int, Field(ge=10, le=3_600_000)] = Field(
        5000, description="with local_allowance: a slice unused this long is handed back"
    )
    max_checks_in_flight: Annotated[int, Field(ge=0, le=1_000_000)] = Field(
        512,
        description="checks this sidecar works on at once (CheckStream's count one each); more are refused at once "
        "with RESOURCE_EXHAUSTED rather than queued; 0: no bound",
    )
    max_pending_calls: Annotated[int, Field(ge=0, le=1_000_000)] = Field(
        128,
        description="calls gRPC holds before the sidecar's handlers take them (under overload the queue forms there, "
        "not in max_checks_in_flight); from this many it refuses new calls (CANCELLED) with a rising probability, "
        "every one beyond twice as many; 0: gRPC's own limits (1000 and 3000)",
    )
    max_streams_per_connection: Annotated[int, Field(ge=0, le=1_000_000)] = Field(
        0,
        description="calls one client connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS, "
        "enforced by gRPC's C core at no Python cost): a client that wants more queues them itself instead of "
        "sending them, so a noisy connection's excess costs this sidecar nothing; each open CheckStream or "
        "ReportStream holds one; 0 (the default): gRPC's default, no limit",
    )
    overload_busy_share: Annotated[float, Field(ge=0, le=1)] = Field(
        0.0,
        description="from this share of time with work on the sidecar's event loop (its CPU is behind), a check of a "
        "tenant that asked more than an equal part and took its fair share of the checks admitted lately is refused "
        "with RESOURCE_EXHAUSTED, so the other tenants still get in; a refusal costs about half a check, so this "
        "trades throughput for fairness (docs/reliability.md); needs max_checks_in_flight; 0 (the default): off",
    )
    tenant_in_flight_share: Annotated[float, Field(gt=0, le=1)] = Field(
        0.75,
        description="the most of max_checks_in_flight one tenant may hold, so others still get in (a sidecar bound "
        "to a tenant with --tenant gives it all)",
    )
    default_lease_seconds: Annotated[int, Field(ge=1)] = Field(
        600, description="lease of a reservation when neither the request nor the task type sets one"
    )
    max_lease_seconds: Annotated[int, Field(ge=1, le=7 * 86400)] = Field(
        86400, description="longest lease a request may ask for"
    )
    reservation_retention_seconds: Annotated[int, Field(ge=60)] = Field(
        86400, description="how long a reservation record is kept after its lease, for replays and late reports"
    )
    task_retention_seconds: Annotated[int, Field(ge=60)] = Field(
        7 * 86400, description="how long an idle task's counter is kept"
    )
    idempotency_window_seconds: Annotated[int, Field(ge=60)] = Field(
        86400, description="how long a report's idempotency key is remembered, on top of the longest lease"
    )
    usage_stream_max_len: Annotated[int, Field(ge=1000)] = Field(
        1_000_000, description="usage events kept per tenant stream, at most (approximately)"
    )
    usage_stream_max_age_seconds: Annotated[int, Field(ge=60)] = Field(
        7 * 86400, description="usage events older than this are trimmed from the stream"
    )
    window_grace_seconds: Annotated[int, Field(ge=0)] = Field(
        3600, description="how long a tenant window's counter outlives its window, so late reports still count"
    )
    shutdown_grace_seconds: Annotated[float, Field(ge=0)] = Field(
        10.0, description="how long in-flight calls may take to finish on SIGTERM"
    )
    metrics_port: Annotated[int, Field(ge=1, le=65535)] | None = Field(
        None, description="port of a Prometheus scrape endpoint (/metrics); unset: none. OTLP export: OTEL_* variables"
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="address the Prometheus endpoint listens on (loopback: its series name tenants; 0.0.0.0 for a "
        "scraper on another host)",
    )
    metrics_tenant_gauges: bool = Field(
        True,
        description="export the tenant-wide gauges read from Redis (budget.remaining, reservations.active); every "
        "sidecar of a tenant reports the same value, so aggregate them with max, or turn this off on all but a few",
    )
    metric_labels: str = Field(
        "", description="comma-separated request label keys promoted to metric attributes (e.g. user,feature)"
    )
    metric_max_tenants: Annotated[int, Field(ge=1)] = Field(
        100, description="distinct tenants in metric attributes; more are folded into '_other'"
    )
    metric_max_task_types: Annotated[int, Field(ge=1)] = Field(
        50, description="distinct task types in metric attributes; more are folded into '_other'"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    log_format: Literal["json", "text"] = Field("json", description="json (one object per line) or text")

    @field_validator("redis_url")
    @classmethod
    def _redis_url_scheme(cls, url: str | None) -> str | None:
        """Refused at start in one line, rather than a traceback from the Redis client on the first call."""
        if url is None:
            return None
        scheme, sep, _ = url.partition("://")
        if sep and scheme.lower() in REDIS_URL_SCHEMES:
            return url
        # Only the scheme is quoted: the rest of a URL may hold a password.
        got = f"{scheme}://" if sep else "no scheme"
        raise PydanticCustomError(
            "redis_url_scheme",
            "must be a redis://, rediss://, unix:// or redis+sentinel:// URL (got {got})",
            {"got": got},
        )

    @field_validator("notify_webhook_urls", "notify_slack_urls")
    @classmethod
    def _notify_urls(cls, text: str) -> str:
        for url in split_list(text):
            if not url.lower().startswith(("http://", "https://")):
                # Only the scheme is quoted: a Slack URL is itself a secret.
                scheme, sep, _ = url.partition("://")
                got = f"{scheme}://" if sep else "no scheme"
                raise PydanticCustomError("notify_url", "must be http:// or https:// URLs (got {got})", {"got": got})
        return text

    @field_validator("notify_fractions")
    @classmethod
    def _fractions(cls, text: str) -> str:
        for part in split_list(text):
            try:
                value = float(part)
            except ValueError:
                value = -1.0
            if not 0 < value <= 1:
                raise PydanticCustomError(
                    "notify_fraction", "each must be a number above 0 and at most 1 (got {got})", {"got": part}
                )
        return text

    @property
    def notify_fractions_bp(self) -> tuple[int, ...]:
        """The notified fractions in basis points, each once, in order."""
        return tuple(sorted({round(float(part) * 10_000) for part in split_list(self.notify_fractions)}))

    @model_validator(mode="after")
    def _tls_and_credentials_agree(self) -> Settings:
        """Settings that only make sense together are refused at start, each naming the setting."""

        def refuse(name: str, message: str) -> None:
            raise PydanticCustomError("settings_conflict", "{name}: {message}", {"name": name, "message": message})

        if self.redis_password is not None and self.redis_password_file is not None:
            refuse("redis_password_file", "set redis_password or redis_password_file, not both")
        for name in ("redis_username", "redis_password", "redis_password_file"):
            if getattr(self, name) is not None and self.redis_url is None:
                refuse(
                    name, "needs a redis_url (the embedded server takes no password: it listens on a private socket)"
                )
        redis_tls = ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")
        tls_url = (self.redis_url or "").lower().startswith(("rediss://", "rediss+sentinel://"))
        for name in redis_tls:
            if getattr(self, name) is not None and not tls_url:
                refuse(name, "needs a rediss:// redis_url (TLS)")
        if self.redis_cluster and "+sentinel://" in (self.redis_url or "").lower():
            refuse("redis_cluster", "a redis+sentinel:// URL names a master and its replicas, not a Cluster")
        if (self.redis_tls_cert_file is None) != (self.redis_tls_key_file is None):
            refuse("redis_tls_key_file", "redis_tls_cert_file and redis_tls_key_file go together")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            refuse("tls_key_file", "tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            refuse("tls_client_ca_file", "mutual TLS needs tls_cert_file and tls_key_file")
        if split_list(self.notify_webhook_urls):
            if self.notify_secret_file is None:
                refuse("notify_secret_file", "notify_webhook_urls are signed: give the key's file")
            elif not self.notify_secret_file.is_file():
                refuse("notify_secret_file", f"no such file: {self.notify_secret_file} (webhooks are signed)")
        if self.notify_backoff_initial_ms > self.notify_backoff_max_ms:
            refuse("notify_backoff_max_ms", "must be at least notify_backoff_initial_ms")
        return self

    # What a config file set (load_settings sets it on a subclass): below flags and environment variables.
    config_file_values: ClassVar[dict[str, Any]] = {}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, InitSettingsSource(settings_cls, cls.config_file_values)


class ConfigFileError(ValueError):
    """A settings file that is missing, unreadable or not a YAML mapping."""


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"{path}: cannot read the config file: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        raise ConfigFileError(f"{path}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}:1: expected a mapping of settings, got {type(data).__name__}")
    return data


def load_settings(config_file: Path | None = None, **flags: Any) -> Settings:
    """Flags (non-None values) win over the environment, which wins over ``config_file``."""
    overrides = {name: value for name, value in flags.items() if value is not None}
    if config_file is None:
        return Settings(**overrides)
    from_file = _read_config_file(config_file)

    class _FromFile(Settings):
        config_file_values = from_file

    return Settings.model_validate(_FromFile(**overrides).model_dump())
