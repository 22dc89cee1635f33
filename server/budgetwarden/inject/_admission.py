"""Admission: an AdmissionReview in, the answer out (allowed, denied, or allowed with the patch)."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._config import InjectConfig
from ._exceptions import AnnotationError
from ._kube import NamespaceObjects, how_to_create
from ._metrics import InjectorMetrics
from ._patch import _addr_ops, injection_patch, pod_settings
from ._values import (
    ADDR_ENV,
    INJECT,
    KNOWN_ANNOTATIONS,
    PREFIX,
    SIDECAR_NAME,
    STATUS,
    STATUS_INJECTED,
    _inject_flag,
)

log = logging.getLogger("budgetwarden.inject")

ADMISSION_API_VERSION = "admission.k8s.io/v1"


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

    def __init__(
        self,
        config: InjectConfig,
        namespace_objects: NamespaceObjects | None = None,
        metrics: InjectorMetrics | None = None,
    ) -> None:
        self.config = config
        self.excluded = frozenset({config.namespace, *config.skip_namespaces})
        # With --check-namespace-objects: asks the API whether a pod's namespace holds what its sidecar mounts.
        self.namespace_objects = namespace_objects
        self.metrics = metrics

    def handle(self, body: bytes, inject_all: bool, route: str = "/mutate") -> tuple[int, bytes, str]:
        """(HTTP status, body, content type) for a POST body; counted in the metrics under ``route``."""
        started = time.monotonic()
        status, payload, content_type, result = self._answer(body, inject_all)
        if self.metrics is not None:
            self.metrics.admission(route, result, time.monotonic() - started)
        return status, payload, content_type

    def _answer(self, body: bytes, inject_all: bool) -> tuple[int, bytes, str, str]:
        try:
            request = parse_review(body)
        except BadReviewError as exc:
            log.warning("bad admission review: %s", exc, extra={"problem": str(exc)})
            return 400, (str(exc) + "\n").encode(), "text/plain; charset=utf-8", "bad_request"
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
        return 200, json.dumps(review, separators=(",", ":")).encode(), "application/json", outcome.result

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
        refusal = self._lacking(namespace, warnings)
        if refusal:
            return Outcome("denied", refusal, [], warnings)
        patch = injection_patch(self.config, pod, settings)
        where = "a regular container" if self.config.legacy_sidecar else "a native sidecar"
        return Outcome("injected", f"injected as {where} for tenant {settings.tenant!r}", patch, warnings)

    def _lacking(self, namespace: str, warnings: list[str]) -> str:
        """With --check-namespace-objects: why the pod is refused (what its namespace lacks), or ''. A check that
        could not be made only warns: the injector's own trouble never blocks a pod."""
        if self.namespace_objects is None:
            return ""
        verdict = self.namespace_objects.check(namespace)
        warnings.extend(verdict.warnings)
        result = "missing" if verdict.missing else ("unchecked" if verdict.warnings else "complete")
        if self.metrics is not None:
            self.metrics.namespace_checks.labels(result=result).inc()
        if not verdict.missing:
            return ""
        return (
            f"budgetwarden sidecar injection: namespace {namespace!r} has no {' and no '.join(verdict.missing)}; "
            f"the sidecar mounts it and could not start, so the pod is refused until it exists. "
            f"Create it: {how_to_create(self.config, namespace, verdict.missing_kinds)}"
        )

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
