"""The injector's few calls to the Kubernetes API: is the policy ConfigMap (and the Redis Secret) in a pod's namespace,
and keep the MutatingWebhookConfiguration's caBundle equal to the self-signed CA.

Three read/patch calls over HTTPS with the pod's ServiceAccount token, so the standard library's http.client does it
(the official client would bring a dozen packages into the image every sidecar runs). The token file is read on every
call: the kubelet rotates bound tokens.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from ._config import InjectConfig
from ._exceptions import InjectError

log = logging.getLogger("budgetwarden.inject")

API_TIMEOUT_S = 2.0
# All of one admission's checks together, well inside the webhook's own 5 s: a slow API server costs a warning, never
# the answer (past the 5 s the API server would create the pod without a sidecar, failurePolicy: Ignore).
CHECK_BUDGET_S = 2.5
PRESENT_TTL_S = 30.0  # a namespace found complete is not asked again for this long


class KubeApiError(Exception):
    """The API server could not be asked (connection, TLS, timeout, an answer that is not JSON)."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


def api_url(config: InjectConfig, environ: Mapping[str, str]) -> str:
    """--kube-api, else the in-cluster address from KUBERNETES_SERVICE_HOST/PORT, else '' (no API)."""
    if config.kube_api:
        return config.kube_api.rstrip("/")
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        return ""
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


class KubeApi:
    """GET and PATCH against the API server with a bearer token, trusting its CA file."""

    def __init__(self, url: str, token_file: Path, ca_file: Path, timeout: float = API_TIMEOUT_S) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise InjectError(f"--kube-api {url!r}: expected https://HOST[:PORT]")
        self.host, self.port, self.timeout = parts.hostname, parts.port or 443, timeout
        self.token_file = token_file
        try:
            self.context = ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise InjectError(f"--kube-ca-file {ca_file}: {exc}") from None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> Answer:
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise KubeApiError(f"cannot read the token {self.token_file}: {exc.strerror or exc}") from None
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        connection = http.client.HTTPSConnection(
            self.host, self.port, timeout=self.timeout if timeout is None else timeout, context=self.context
        )
        try:
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise KubeApiError(f"{method} {path}: {exc}") from None
        finally:
            connection.close()
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            raise KubeApiError(f"{method} {path}: HTTP {response.status}, not JSON") from None
        return Answer(response.status, data if isinstance(data, dict) else {})


def kube_api(config: InjectConfig, environ: Mapping[str, str] | None = None) -> KubeApi | None:
    """The API client when something needs it (--check-namespace-objects, --patch-webhook-ca), else None."""
    if not (config.check_namespace_objects or config.patch_webhook_ca):
        return None
    url = api_url(config, os.environ if environ is None else environ)
    if not url:
        raise InjectError(
            "--check-namespace-objects and --patch-webhook-ca talk to the Kubernetes API: run in a cluster "
            "(KUBERNETES_SERVICE_HOST) or give --kube-api"
        )
    return KubeApi(url, config.kube_token_file, config.kube_ca_file)


@dataclass(frozen=True)
class NamespaceVerdict:
    missing: list[str]  # what the sidecar needs and the namespace lacks: the pod is refused
    warnings: list[str]  # what could not be checked: the pod is injected anyway
    missing_kinds: frozenset[str] = frozenset()  # ConfigMap, Secret: which commands the refusal gives


class NamespaceObjects:
    """Does a namespace hold what an injected sidecar mounts: the policy ConfigMap (with its key) and, with
    --redis-url-secret, the Redis Secret (with its key)? A namespace found complete is remembered for a while;
    a missing object is asked again on the next pod, so creating it takes effect at once."""

    def __init__(
        self,
        config: InjectConfig,
        api: KubeApi,
        clock: Callable[[], float] = time.monotonic,
        ttl: float = PRESENT_TTL_S,
    ) -> None:
        self.config, self.api, self.clock, self.ttl = config, api, clock, ttl
        self._complete_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def wanted(self, namespace: str) -> list[tuple[str, str, str, str]]:
        """(kind, name, key, what it is for) of each object the sidecar of a pod in ``namespace`` needs."""
        needs = []
        if self.config.policy_configmap:
            needs.append(("ConfigMap", self.config.policy_configmap, self.config.policy_key, "the policy"))
        if self.config.redis_url_secret:
            name, key = self.config.redis_secret_ref
            needs.append(("Secret", name, key, "the Redis URL"))
        return needs

    def check(self, namespace: str) -> NamespaceVerdict:
        with self._lock:
            if self._complete_until.get(namespace, 0.0) > self.clock():
                return NamespaceVerdict([], [])
        missing: list[str] = []
        missing_kinds: set[str] = set()
        warnings: list[str] = []
        deadline = time.monotonic() + CHECK_BUDGET_S
        for kind, name, key, purpose in self.wanted(namespace):
            plural = "configmaps" if kind == "ConfigMap" else "secrets"
            path = f"/api/v1/namespaces/{quote(namespace)}/{plural}/{quote(name)}"
            left = deadline - time.monotonic()
            if left <= 0.05:
                warnings.append(f"budgetwarden: did not check for {kind} {name!r} in {namespace!r}: out of time")
                continue
            try:
                answer = self.api.request("GET", path, timeout=min(left, self.api.timeout))
            except KubeApiError as exc:
                warnings.append(f"budgetwarden: could not check for {kind} {name!r} in {namespace!r}: {exc}")
                continue
            if answer.status == 404:
                missing.append(f"{kind} {name!r} with key {key!r} ({purpose})")
                missing_kinds.add(kind)
            elif answer.status == 200:
                if key not in (answer.body.get("data") or {}):
                    missing.append(f"key {key!r} in {kind} {name!r} ({purpose})")
                    missing_kinds.add(kind)
            else:
                reason = answer.body.get("message") or f"HTTP {answer.status}"
                warnings.append(f"budgetwarden: could not check for {kind} {name!r} in {namespace!r}: {reason}")
        if not missing and not warnings:
            with self._lock:
                self._complete_until[namespace] = self.clock() + self.ttl
        return NamespaceVerdict(missing, warnings, frozenset(missing_kinds))


def how_to_create(config: InjectConfig, namespace: str, kinds: frozenset[str]) -> str:
    """The commands that create the ``kinds`` of object a namespace lacks (named in the refusal)."""
    steps = []
    if "ConfigMap" in kinds and config.policy_configmap:
        steps.append(f"kubectl kustomize k8s/base/policy | kubectl apply -n {namespace} -f -")
    if "Secret" in kinds and config.redis_url_secret:
        name, key = config.redis_secret_ref
        steps.append(f"kubectl -n {namespace} create secret generic {name} --from-literal={key}=rediss://...")
    return "; ".join(steps)


WEBHOOKS_PATH = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/"
CA_SYNC_RETRY_S = 5.0
CA_SYNC_RECHECK_S = 60.0


class WebhookCaBundle:
    """Keeps every entry of the MutatingWebhookConfiguration ``name`` trusting ``bundle`` (base64 PEM): checked at
    start and every minute, patched where it differs (a JSON patch that tests each entry's name first, so a
    configuration changed in between is not patched blindly)."""

    def __init__(self, api: KubeApi, name: str, bundle: str, on_result: Callable[[str], None] | None = None) -> None:
        self.api, self.name, self.bundle = api, name, bundle
        self.on_result = on_result or (lambda result: None)
        self.in_sync = False
        self._warned = False

    def sync(self) -> bool:
        """True when every entry trusts the bundle (after patching them); False, logged, when that failed."""
        path = WEBHOOKS_PATH + quote(self.name)
        try:
            answer = self.api.request("GET", path)
            if answer.status != 200:
                raise KubeApiError(f"GET {path}: {answer.body.get('message') or f'HTTP {answer.status}'}")
            operations: list[dict[str, Any]] = []
            for index, entry in enumerate(answer.body.get("webhooks") or []):
                if (entry.get("clientConfig") or {}).get("caBundle") != self.bundle:
                    at = f"/webhooks/{index}"
                    operations.append({"op": "test", "path": f"{at}/name", "value": entry.get("name")})
                    operations.append({"op": "add", "path": f"{at}/clientConfig/caBundle", "value": self.bundle})
            if operations:
                patched = self.api.request("PATCH", path, operations, content_type="application/json-patch+json")
                if patched.status != 200:
                    raise KubeApiError(f"PATCH {path}: {patched.body.get('message') or f'HTTP {patched.status}'}")
                log.info("caBundle written into %s", self.name, extra={"entries": len(operations) // 2})
                self.on_result("patched")
            else:
                self.on_result("unchanged")
        except KubeApiError as exc:
            if self.in_sync or not self._warned:  # once per failing spell, not every retry
                log.warning("could not write the caBundle of %s: %s", self.name, exc, extra={"error": str(exc)})
                self._warned = True
            self.in_sync = False
            self.on_result("failed")
            return False
        self.in_sync = True
        return True

    def run(self, stopping: threading.Event) -> None:
        """Sync until ``stopping``: retried every few seconds until it works, then checked every minute."""
        while True:
            try:
                self.sync()
            except Exception:  # a bug here must not end the thread: the next round tries again
                log.exception("caBundle check failed")
            if stopping.wait(CA_SYNC_RECHECK_S if self.in_sync else CA_SYNC_RETRY_S):
                return
