"""Sidecar injection: a Kubernetes mutating admission webhook that adds the budgetwarden sidecar to agent pods.

``budgetwarden inject-webhook`` serves HTTPS and answers ``admission.k8s.io/v1`` AdmissionReviews for pod CREATE with
a JSONPatch. Routes:

- ``POST /mutate``: inject pods that opt in (annotation or label ``budgetwarden.io/inject: "true"``); with
  ``--inject-all``, inject every pod that does not opt out (``"false"``).
- ``POST /mutate-all``: always "inject unless the pod opts out". The webhook sees only the pod, never its namespace's
  labels, so per-namespace opt-in is done by the MutatingWebhookConfiguration: a webhook entry whose namespaceSelector
  matches ``budgetwarden.io/inject=enabled`` calls ``/mutate-all``, another for the remaining namespaces calls
  ``/mutate``.
- ``GET /healthz`` (the process serves), ``GET /readyz`` (a certificate is loaded and the server is not draining) and
  ``GET /metrics`` (the webhook's own Prometheus metrics: admissions by route and result, their latency, namespace
  checks, caBundle syncs).

Answers, by what arrives (the policy the README documents):

- a body that is not a JSON AdmissionReview ``admission.k8s.io/v1`` with ``request.uid``: HTTP 400 and a one-line
  message (no valid AdmissionReview can be answered without the uid; the API server applies its failurePolicy);
- a well-formed review the webhook does not change (not a pod, not CREATE, no object, excluded namespace, not opted
  in, host network, already injected): ``allowed: true``, no patch, the reason in ``status.message`` and, where the
  request looks misrouted or suspicious, in ``warnings`` (shown by kubectl);
- an opted-in pod whose ``budgetwarden.io/*`` annotations are invalid: ``allowed: false``, code 400, naming the
  annotation (injecting a guess would silently bind the wrong tenant or resources);
- with ``--check-namespace-objects``, an opted-in pod whose namespace lacks the policy ConfigMap (or the
  ``--redis-url-secret`` Secret) its sidecar mounts: ``allowed: false``, naming what is missing and how to create it
  (the pod could not start; a check the API could not answer only warns);
- otherwise ``allowed: true`` with ``patchType: JSONPatch`` and the base64 patch.

Nothing a client sends can stop the server: every request is handled in its own thread and every error is answered.

The code lives in private modules, each importing only those above it:

- ``_inject_exceptions``: InjectError, InjectConfigError, AnnotationError;
- ``_inject_values``: the budgetwarden.io/* annotation and label names and the rules for their values;
- ``_inject_config``: InjectConfig and the ``inject-webhook`` flags and BUDGETWARDEN_INJECT_* variables;
- ``_inject_patch``: a pod's settings from its annotations, the sidecar container, the JSONPatch;
- ``_inject_admission``: AdmissionReview in, answer out (Injector);
- ``_inject_tls``: the serving certificate, from files (reloaded) or self-signed;
- ``_kube``: the few Kubernetes API calls (namespace objects, the webhook's caBundle) and ``_metrics``;
- ``_inject_server``: the HTTPS server (WebhookServer) and ``run``.

This module is their public surface, for the CLI and the tests.
"""

from ._admission import BadReviewError, Injector, Outcome, parse_review
from ._config import InjectConfig, add_arguments, config_from_args, parse_listen
from ._exceptions import AnnotationError, InjectConfigError, InjectError
from ._kube import KubeApi, KubeApiError, NamespaceObjects, WebhookCaBundle, kube_api
from ._metrics import InjectorMetrics
from ._patch import PodSettings, injection_patch, pod_settings, pointer, sidecar_container
from ._server import WebhookServer, run
from ._tls import (
    CertificateSource,
    FileCertificate,
    SelfSignedCertificate,
    ca_bundle,
    certificate_source,
    context_from_pem,
    generate_ca,
    issue_serving_certificate,
    load_or_create_ca,
)
from ._values import _quantity as _quantity  # the tests check resources with it

__all__ = [
    "AnnotationError",
    "BadReviewError",
    "CertificateSource",
    "FileCertificate",
    "InjectConfig",
    "InjectConfigError",
    "InjectError",
    "Injector",
    "InjectorMetrics",
    "KubeApi",
    "KubeApiError",
    "NamespaceObjects",
    "Outcome",
    "PodSettings",
    "SelfSignedCertificate",
    "WebhookCaBundle",
    "WebhookServer",
    "add_arguments",
    "ca_bundle",
    "certificate_source",
    "config_from_args",
    "context_from_pem",
    "generate_ca",
    "injection_patch",
    "issue_serving_certificate",
    "kube_api",
    "load_or_create_ca",
    "parse_listen",
    "parse_review",
    "pod_settings",
    "pointer",
    "run",
    "sidecar_container",
]
