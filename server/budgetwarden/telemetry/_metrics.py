"""OpenTelemetry metrics: what operators and billing teams read. The check path only records into the SDK's
in-memory aggregations; export runs on the SDK reader's own thread (OTLP) or on scrape (Prometheus).

Cardinality is bounded: task and step ids are never attributes, request labels become attributes only when their key
is allow-listed, and tenants and task types beyond a cap are folded into one overflow value. An attribute whose value is
unknown (no model, no task type) is left out rather than sent as "".
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import OTELResourceDetector, Resource

from budgetwarden import __version__

if TYPE_CHECKING:
    from ._scrape import ScrapeEndpoint

log = logging.getLogger("budgetwarden.telemetry")

METER_NAME = "budgetwarden"
OVERFLOW = "_other"
# The GenAI semantic conventions' token buckets, and buckets fit for sub-millisecond work.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
GENAI_LATEST = "gen_ai_latest_experimental"
# Every value of these counters' attribute is exported from the start, at 0 until it is counted.
FAIL_MODES = ("open", "closed")
RELOAD_RESULTS = ("applied", "rejected")


def genai_latest_requested(environ: dict[str, str] | None = None) -> bool:
    """OTEL_SEMCONV_STABILITY_OPT_IN, as OTel instrumentations read it: a comma-separated list of opt-ins."""
    value = (environ if environ is not None else os.environ).get("OTEL_SEMCONV_STABILITY_OPT_IN", "")
    return GENAI_LATEST in {part.strip() for part in value.split(",")}


class _Capped:
    """At most ``limit`` distinct values pass; later new ones become the overflow value."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen or not value:  # an unknown ("") value takes no slot: it is left out, not exported
            return value
        if len(self._seen) >= self._limit:
            return OVERFLOW
        self._seen.add(value)
        return value

    def values(self) -> list[str]:
        return sorted(self._seen)


Attributes = tuple[tuple[str, str], ...]


def _known(*pairs: tuple[str, str]) -> Attributes:
    """The attributes whose value is known: an empty one is left out, not exported as ""."""
    for _, value in pairs:
        if not value:
            return tuple([pair for pair in pairs if pair[1]])  # a list, not a generator: cheaper for a few pairs
    return pairs  # every value known, as on nearly every check: no generator, no new tuple


class _Sum:
    """A monotonic sum kept in a plain dict on the hot path and reported through an observable counter when the
    reader collects: a dict update costs far less than an SDK measurement (attribute cleaning and hashing)."""

    __slots__ = ("_totals",)

    def __init__(self, meter: Meter, name: str, unit: str, description: str) -> None:
        self._totals: dict[Attributes, float] = {}
        meter.create_observable_counter(name, [self._observe], unit, description)

    def add(self, value: float, attributes: Attributes) -> None:
        self._totals[attributes] = self._totals.get(attributes, 0) + value

    def start_at_zero(self, *attribute_sets: Attributes) -> None:
        """Export these series at 0 before anything is counted, so a panel shows 0 rather than "No data"."""
        for attributes in attribute_sets:
            self._totals.setdefault(attributes, 0)

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        # list() copies the dict in one step under the GIL, so the event loop may keep adding meanwhile.
        return [Observation(total, dict(attributes)) for attributes, total in list(self._totals.items())]


CHECK_ATTRIBUTES_MAX = 4096


class _CheckAttributes:
    """One distinct check's attributes: the decisions counter's, the duration histogram's (never mutated: the SDK
    copies them), and the reserved tokens' once it reserved."""

    __slots__ = ("decisions", "duration", "usage")

    def __init__(self, decisions: Attributes, duration: dict[str, str]) -> None:
        self.decisions = decisions
        self.duration = duration
        self.usage: Attributes | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportedUsage:
    """One applied usage record, as telemetry needs it."""

    tenant_id: str
    task_type: str
    model: str
    provider: str
    status: str  # applied, duplicate, unreserved
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_usd_micros: int
    refunded_tokens: int
    # Reported after its reservation's lease lapsed (the budget it held was free for other steps meanwhile).
    late: bool = False


GaugeSource = Callable[[Sequence[str]], Iterable[tuple[str, int, dict[str, int]]]]


class Telemetry:
    """The instruments. Build with :func:`telemetry_from_env`, or with an explicit provider in tests."""

    def __init__(
        self,
        provider: MeterProvider | None,
        *,
        label_keys: Sequence[str] = (),
        max_tenants: int = 100,
        max_task_types: int = 50,
        genai_latest: bool = False,
        tenant_gauges: bool = True,
    ) -> None:
        self.provider = provider
        self.enabled = provider is not None
        self.label_keys = tuple(label_keys)
        self.tenant = _Capped(max_tenants)
        self.task_type = _Capped(max_task_types)
        self.model = _Capped(max_task_types * 4)
        # A check's attributes by what it was called with: what the caps make of a value never changes once they have
        # seen it (a value that got a slot keeps it, one refused stays refused), so they are made once per distinct
        # check. The usage attributes are made when a check first reserves (only then is its model counted).
        self._check_attributes: dict[tuple[str, str, str, str, str], _CheckAttributes] = {}
        self.genai_latest = genai_latest
        self._gauge_source: GaugeSource | None = None
        # The Prometheus endpoint, when one is configured: started and stopped on the event loop (start, aclose).
        self.scrape_endpoint: tuple[ScrapeEndpoint, str, int] | None = None
        if provider is None:
            return
        meter: Meter = provider.get_meter(METER_NAME, __version__)
        self.decisions = _Sum(meter, "budgetwarden.check.decisions", "{decision}", "Check decisions")
        self.check_duration = meter.create_histogram(
            "budgetwarden.check.duration", "s", "Time to answer a check (validation to decision)"
        )
        self.fail_mode = _Sum(
            meter, "budgetwarden.check.fail_mode", "{decision}", "Checks answered by the fail mode (store unavailable)"
        )
        self.fail_mode.start_at_zero(*((("budgetwarden.fail_mode", mode),) for mode in FAIL_MODES))
        self.reserved = _Sum(meter, "budgetwarden.tokens.reserved", "{token}", "Tokens reserved by checks")
        self.consumed = _Sum(meter, "budgetwarden.tokens.consumed", "{token}", "Tokens reported as used")
        self.refunded = _Sum(
            meter, "budgetwarden.tokens.refunded", "{token}", "Reserved tokens handed back because a step used less"
        )
        self.late = _Sum(
            meter,
            "budgetwarden.usage.late_tokens",
            "{token}",
            "Tokens reported after their reservation's lease lapsed (its budget was free for other steps meanwhile)",
        )
        # Currency is no UCUM unit: the name carries it (Prometheus: budgetwarden_cost_consumed_usd_total) and the unit
        # is an annotation, which exporters drop from names rather than appending "_USD".
        self.cost = _Sum(meter, "budgetwarden.cost.consumed_usd", "{USD}", "Cost of reported usage, in US dollars")
        self.reports = _Sum(meter, "budgetwarden.reports", "{record}", "Usage records by outcome")
        self.redis_duration = meter.create_histogram(
            "budgetwarden.redis.duration", "s", "Round trip of one budget script call to Redis"
        )
        self.shed_checks = _Sum(
            meter,
            "budgetwarden.check.shed",
            "{check}",
            "Checks refused at once (RESOURCE_EXHAUSTED) by reason: too many in flight, a tenant over its share, "
            "too little deadline left",
        )
        self.admin_calls = _Sum(
            meter,
            "budgetwarden.admin.calls",
            "{call}",
            "Admin calls to the control plane (gRPC and console) by call and outcome, refusals included",
        )
        self.reloads = _Sum(meter, "budgetwarden.policy.reloads", "{reload}", "Policy reloads by result")
        self.reloads.start_at_zero(*((("budgetwarden.policy.result", result),) for result in RELOAD_RESULTS))
        if tenant_gauges:
            self._tenant_gauges(meter)
        if genai_latest:
            self.genai_input = _Sum(
                meter, "gen_ai.client.inference.usage.input_tokens", "{token}", "Input tokens used, cached included"
            )
            self.genai_output = _Sum(
                meter, "gen_ai.client.inference.usage.output_tokens", "{token}", "Output tokens used"
            )
            self.genai_cached = _Sum(
                meter,
                "gen_ai.client.inference.usage.cache_read.input_tokens",
                "{token}",
                "Input tokens read from a cache",
            )
        else:
            self.genai_usage = meter.create_histogram(
                "gen_ai.client.token.usage", "{token}", "Measures number of input and output tokens used"
            )

    def _tenant_gauges(self, meter: Meter) -> None:
        """Read from Redis per tenant: tenant-wide facts, so every sidecar that serves a tenant reports the same
        value. Aggregate them across sidecars with max (never sum), or export them from fewer sidecars."""
        meter.create_observable_gauge(
            "budgetwarden.reservations.active",
            [self._observe_active],
            "{reservation}",
            "Reservations held now, per tenant (tenant-wide: the same from every sidecar)",
        )
        meter.create_observable_gauge(
            "budgetwarden.budget.remaining",
            [self._observe_remaining],
            "{token}",
            "Tokens left in each enforced tenant window (tenant-wide: the same from every sidecar)",
        )

    # --- recording (event-loop thread) ----------------------------------------------------------------------

    def _labels(self, labels: dict[str, str]) -> Attributes:
        return tuple((f"budgetwarden.label.{key}", labels[key]) for key in self.label_keys if key in labels)

    def check(
        self,
        *,
        tenant_id: str,
        task_type: str,
        model: str,
        decision: str,
        reason: str,
        reserved_tokens: int,
        fail_mode: str | None,
        seconds: float,
        labels: dict[str, str],
    ) -> None:
        if not self.enabled:
            return
        key = (tenant_id, task_type, model, decision, reason)
        made = self._check_attributes.get(key)
        if made is None:
            tenant, kind = self.tenant(tenant_id), self.task_type(task_type)
            attributes = _known(
                ("budgetwarden.decision", decision),
                ("budgetwarden.reason", reason),
                ("budgetwarden.tenant", tenant),
                ("budgetwarden.task_type", kind),
            )
            made = _CheckAttributes(attributes, {"budgetwarden.decision": decision})
            if len(self._check_attributes) >= CHECK_ATTRIBUTES_MAX:
                self._check_attributes.clear()  # bounded: ids come from callers (the caps bound only what is exported)
            self._check_attributes[key] = made
        attributes = made.decisions
        self.decisions.add(1, attributes + self._labels(labels) if self.label_keys else attributes)
        self.check_duration.record(seconds, made.duration)
        if fail_mode is not None:
            self.fail_mode.add(1, (("budgetwarden.fail_mode", fail_mode),))
        if reserved_tokens:
            usage = made.usage
            if usage is None:
                usage = made.usage = _known(
                    ("budgetwarden.tenant", self.tenant(tenant_id)),
                    ("budgetwarden.task_type", self.task_type(task_type)),
                    ("gen_ai.request.model", self.model(model)),
                )
            self.reserved.add(reserved_tokens, usage)

    def reported(self, records: Iterable[ReportedUsage]) -> None:
        if not self.enabled:
            return
        for r in records:
            tenant = self.tenant(r.tenant_id)
            self.reports.add(1, (("budgetwarden.report.status", r.status), ("budgetwarden.tenant", tenant)))
            if r.status == "duplicate":
                continue
            model = self.model(r.model)
            usage = _known(
                ("budgetwarden.tenant", tenant),
                ("budgetwarden.task_type", self.task_type(r.task_type)),
                ("gen_ai.request.model", model),
            )
            self.consumed.add(r.input_tokens + r.output_tokens, usage)
            self.cost.add(r.cost_usd_micros / 1_000_000, usage)
            if r.refunded_tokens:
                self.refunded.add(r.refunded_tokens, usage)
            if r.late:
                self.late.add(r.input_tokens + r.output_tokens, usage)
            genai = _known(
                ("gen_ai.operation.name", "chat"),
                ("gen_ai.provider.name", r.provider or "unknown"),
                ("gen_ai.request.model", model),
            )
            if self.genai_latest:
                latest = (*genai, ("gen_ai.token.modality", "unknown"))
                self.genai_input.add(r.input_tokens, latest)
                self.genai_output.add(r.output_tokens, latest)
                if r.cached_input_tokens:
                    self.genai_cached.add(r.cached_input_tokens, latest)
            else:
                self.genai_usage.record(r.input_tokens, {**dict(genai), "gen_ai.token.type": "input"})
                self.genai_usage.record(r.output_tokens, {**dict(genai), "gen_ai.token.type": "output"})

    def redis_call(self, script: str, seconds: float) -> None:
        if self.enabled:
            self.redis_duration.record(seconds, {"budgetwarden.redis.script": script})

    def shed(self, tenant_id: str, reason: str) -> None:
        """``reason``: in_flight, tenant_in_flight, fair_share or deadline (transport/_admission.py)."""
        if self.enabled:
            self.shed_checks.add(1, (("budgetwarden.tenant", self.tenant(tenant_id)), ("budgetwarden.reason", reason)))

    def admin_call(self, rpc: str, outcome: str, via: str) -> None:
        """``outcome``: a gRPC status code's name (OK, PERMISSION_DENIED, ...); ``via``: grpc or console."""
        if self.enabled:
            self.admin_calls.add(
                1,
                (
                    ("budgetwarden.admin.rpc", rpc),
                    ("budgetwarden.admin.outcome", outcome),
                    ("budgetwarden.admin.via", via),
                ),
            )

    def policy_reload(self, result: str) -> None:
        if self.enabled:
            self.reloads.add(1, (("budgetwarden.policy.result", result),))

    # --- observing (reader thread) --------------------------------------------------------------------------

    def set_gauge_source(self, source: GaugeSource) -> None:
        """``source(tenants)`` yields (tenant, active reservations, {window: tokens remaining}) per tenant."""
        self._gauge_source = source

    def _gauges(self) -> list[tuple[str, int, dict[str, int]]]:
        if self._gauge_source is None:
            return []
        tenants = [t for t in self.tenant.values() if t != OVERFLOW]
        try:
            return list(self._gauge_source(tenants))
        except Exception as exc:  # a gauge must never break an export; the next one tries again
            log.warning("cannot read budget gauges", extra={"error": repr(exc)})
            return []

    def _observe_active(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(active, {"budgetwarden.tenant": tenant}) for tenant, active, _ in self._gauges()]

    def _observe_remaining(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(left, {"budgetwarden.tenant": tenant, "budgetwarden.window": window})
            for tenant, _, windows in self._gauges()
            for window, left in windows.items()
        ]

    async def start(self) -> None:
        """Serve the Prometheus endpoint, if one is configured (on the running event loop)."""
        if self.scrape_endpoint is not None:
            endpoint, host, port = self.scrape_endpoint
            await endpoint.start(host, port)

    async def aclose(self) -> None:
        """Stop the scrape endpoint, then flush what is recorded (a last OTLP export, on a worker thread)."""
        if self.scrape_endpoint is not None:
            await self.scrape_endpoint[0].stop()
        await asyncio.to_thread(self.shutdown)

    def shutdown(self) -> None:
        """Flush what is recorded (a last OTLP export)."""
        if self.provider is not None:
            self.provider.shutdown()


def _views(genai_latest: bool) -> list[View]:
    seconds = ExplicitBucketHistogramAggregation(SECONDS_BUCKETS)
    tokens = ExplicitBucketHistogramAggregation(TOKEN_BUCKETS)
    views = [
        View(instrument_name="budgetwarden.check.duration", aggregation=seconds),
        View(instrument_name="budgetwarden.redis.duration", aggregation=seconds),
    ]
    if not genai_latest:
        views.append(View(instrument_name="gen_ai.client.token.usage", aggregation=tokens))
    return views


def resource_from_env(environ: dict[str, str] | None = None) -> Resource:
    """service.name/version, plus the pod from the downward API when present; OTEL_RESOURCE_ATTRIBUTES and
    OTEL_SERVICE_NAME win over all of them.

    service.instance.id is the pod's UID when the downward API gives it: stable for the pod's life, so a restarted
    container continues its series, and one per pod, so two sidecars never share one. Elsewhere a random UUID per start.
    """
    env = environ if environ is not None else os.environ
    attributes: dict[str, str] = {"service.name": "budgetwarden", "service.version": __version__}
    for key, names in {
        "k8s.pod.name": ("K8S_POD_NAME", "POD_NAME"),
        "k8s.namespace.name": ("K8S_NAMESPACE_NAME", "POD_NAMESPACE"),
        "k8s.node.name": ("K8S_NODE_NAME", "NODE_NAME"),
        "k8s.pod.uid": ("K8S_POD_UID", "POD_UID"),
    }.items():
        for name in names:
            if env.get(name):
                attributes[key] = env[name]
                break
    attributes["service.instance.id"] = attributes.get("k8s.pod.uid") or str(uuid.uuid4())
    # Resource.create lets the attributes given to it win over OTEL_RESOURCE_ATTRIBUTES; the operator's word is last.
    return Resource.create(attributes).merge(OTELResourceDetector().detect())


def _otlp_reader(environ: dict[str, str]) -> MetricReader | None:
    endpoint = environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        return None
    protocol = environ.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if (protocol or "http/protobuf") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        exporter: object = GrpcExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

        exporter = HttpExporter()
    # The exporters read endpoint, headers, timeout and TLS from the standard OTEL_* variables themselves;
    # OTEL_METRIC_EXPORT_INTERVAL sets the interval.
    return PeriodicExportingMetricReader(exporter)  # type: ignore[arg-type]


def telemetry_from_env(
    *,
    metrics_port: int | None,
    metrics_host: str,
    label_keys: Sequence[str],
    max_tenants: int,
    max_task_types: int,
    tenant_gauges: bool = True,
    environ: dict[str, str] | None = None,
) -> Telemetry:
    """Metrics as configured by the standard OTEL_* variables and budgetwarden's settings. The Prometheus endpoint
    serves once :meth:`Telemetry.start` is awaited."""
    env = dict(environ if environ is not None else os.environ)
    latest = genai_latest_requested(env)

    def build(provider: MeterProvider | None) -> Telemetry:
        return Telemetry(
            provider,
            label_keys=label_keys,
            max_tenants=max_tenants,
            max_task_types=max_task_types,
            genai_latest=latest,
            tenant_gauges=tenant_gauges,
        )

    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return build(None)
    readers: list[MetricReader] = []
    endpoint: ScrapeEndpoint | None = None
    otlp = _otlp_reader(env)
    if otlp is not None:
        readers.append(otlp)
    if metrics_port is not None:
        # Imported only when a scrape endpoint is asked for.
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry

        from ._scrape import ScrapeEndpoint

        registry = CollectorRegistry()
        readers.append(PrometheusMetricReader(registry=registry))
        endpoint = ScrapeEndpoint(registry)
    if not readers:
        return build(None)
    telemetry = build(MeterProvider(metric_readers=readers, resource=resource_from_env(env), views=_views(latest)))
    if endpoint is not None:
        telemetry.scrape_endpoint = (endpoint, metrics_host, metrics_port or 0)
    return telemetry
