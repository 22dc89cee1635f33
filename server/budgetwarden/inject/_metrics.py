"""The webhook's own metrics, in Prometheus text format at GET /metrics on its HTTPS port (no second listener).

Every series exists from the start at 0, so a dashboard shows 0 rather than "No data" before the first event.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# What an admission came to: the Outcome results, plus the two answers that are not a review.
ADMISSION_RESULTS = ("injected", "updated", "skipped", "denied", "bad_request", "error")
NAMESPACE_CHECK_RESULTS = ("complete", "missing", "unchecked")
CA_BUNDLE_RESULTS = ("patched", "unchanged", "failed")


class InjectorMetrics:
    """Counters and a latency histogram in a registry of their own (not the process-wide default)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.admissions = Counter(
            "budgetwarden_injector_admissions",
            "Admission requests answered, by route and result",
            ["route", "result"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "budgetwarden_injector_admission_duration_seconds",
            "Time to answer an admission request (from the body read to the answer built)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self.namespace_checks = Counter(
            "budgetwarden_injector_namespace_checks",
            "Checks that a pod's namespace holds the policy ConfigMap and Redis Secret its sidecar needs, by result",
            ["result"],
            registry=self.registry,
        )
        self.ca_bundle_syncs = Counter(
            "budgetwarden_injector_ca_bundle_syncs",
            "Checks of the MutatingWebhookConfiguration's caBundle (--patch-webhook-ca), by result",
            ["result"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "budgetwarden_injector_ready", "1 while the webhook answers /readyz with 200", registry=self.registry
        )
        for route in ("/mutate", "/mutate-all"):
            for result in ADMISSION_RESULTS:
                self.admissions.labels(route=route, result=result)
        for result in NAMESPACE_CHECK_RESULTS:
            self.namespace_checks.labels(result=result)
        for result in CA_BUNDLE_RESULTS:
            self.ca_bundle_syncs.labels(result=result)

    def admission(self, route: str, result: str, seconds: float) -> None:
        self.admissions.labels(route=route, result=result).inc()
        self.duration.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
