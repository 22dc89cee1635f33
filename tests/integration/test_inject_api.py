"""The injector's defaults and what it asks the Kubernetes API, over real HTTPS both ways.

- The tenant comes from the namespace unless an operator opts into the annotation.
- ``--check-namespace-objects``: a pod whose namespace lacks the policy ConfigMap (or the Redis Secret) its sidecar
  mounts is refused, naming what is missing and how to create it; a check the API cannot answer only warns.
- ``--patch-webhook-ca``: the self-signed injector writes its CA into every entry of its MutatingWebhookConfiguration.
- ``GET /metrics``: admissions by route and result, their latency, namespace checks and caBundle syncs, at 0 from start.

The API server is a stand-in (``support_k8s.FakeApiServer``: stored objects, GET and JSON-patch PATCH with a bearer
token); the same calls against a real kube-apiserver with RBAC are in docs/development.md.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from budgetwarden.inject import InjectConfig, WebhookServer, kube_api

from support import free_port
from support_k8s import FakeApiServer, find, rendered

IMAGE = "ghcr.io/budgetwarden/budgetwarden:0.1.0"
REDIS = "redis://budgetwarden-redis.budgetwarden.svc:6379/0"
WAIT_S = 120.0


def policy_config_map(namespace: str, key: str = "policy.yaml") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "budgetwarden-policy", "namespace": namespace},
        "data": {key: "version: 1\n"},
    }


def redis_secret(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "budgetwarden-redis", "namespace": namespace},
        "data": {"redis-url": base64.b64encode(b"rediss://:pw@redis.example.com:6380/0").decode()},
    }


class Client:
    def __init__(self, server: WebhookServer) -> None:
        certificates = server.certificates
        self.context = ssl.create_default_context(cadata=certificates.ca_cert_pem.decode())  # type: ignore[attr-defined]
        self.port = server.port

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, str]:
        name = "budgetwarden-injector.budgetwarden.svc"
        connection = http.client.HTTPSConnection(name, self.port, timeout=10, context=self.context)
        connection.sock = self.context.wrap_socket(
            socket.create_connection(("127.0.0.1", self.port), timeout=10), server_hostname=name
        )
        try:
            connection.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
            response = connection.getresponse()
            return response.status, response.read(), response.headers.get("Content-Type", "")
        finally:
            connection.close()

    def admit(self, pod: dict[str, Any], path: str = "/mutate-all") -> dict[str, Any]:
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": str(uuid.uuid4()),
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": pod["metadata"]["namespace"],
                "operation": "CREATE",
                "object": pod,
            },
        }
        status, body, _ = self.request("POST", path, json.dumps(review).encode())
        assert status == 200, body
        response: dict[str, Any] = json.loads(body)["response"]
        return response


def pod(namespace: str = "acme", **annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "agent-",
            "namespace": namespace,
            "annotations": {"budgetwarden.io/inject": "true", **annotations},
        },
        "spec": {"containers": [{"name": "agent", "image": "agent:1"}]},
    }


def sidecar_env(response: dict[str, Any]) -> dict[str, Any]:
    patch = json.loads(base64.b64decode(response["patch"]))
    for op in patch:
        value = op.get("value")
        containers = value if isinstance(value, list) else [value]
        for container in containers:
            if isinstance(container, dict) and container.get("name") == "budgetwarden":
                return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    raise AssertionError(f"no sidecar in {patch}")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeApiServer]:
    with FakeApiServer(tmp_path / "api") as server:
        yield server


def config_for(api: FakeApiServer | None, **settings: Any) -> InjectConfig:
    base: dict[str, Any] = {
        "sidecar_image": IMAGE,
        "redis_url": REDIS,
        "self_signed": True,
        "log_format": "text",
        "listen": f"127.0.0.1:{free_port()}",
    }
    if api is not None:
        base.update(kube_api=api.url, kube_token_file=api.token_file, kube_ca_file=api.ca_file)
    return InjectConfig(**{**base, **settings}).validate()


@pytest.fixture
def serve() -> Iterator[Any]:
    started: list[WebhookServer] = []

    def start(config: InjectConfig) -> tuple[WebhookServer, Client]:
        server = WebhookServer(config).start()
        started.append(server)
        return server, Client(server)

    yield start
    for server in started:
        server.stop()


# --- the tenant ------------------------------------------------------------------------------------------------------


def test_the_tenant_is_the_namespace_unless_the_operator_opts_into_annotations(serve: Any) -> None:
    assert InjectConfig().tenant_source == "namespace"
    _, client = serve(config_for(None))
    assert sidecar_env(client.admit(pod("acme")))["BUDGETWARDEN_TENANT"] == "acme"
    # A pod author cannot name another tenant's budget.
    refused = client.admit(pod("acme", **{"budgetwarden.io/tenant": "globex"}))
    assert refused["allowed"] is False
    assert "budgetwarden.io/tenant" in refused["status"]["message"]
    assert "'acme'" in refused["status"]["message"]
    # Opting into annotations (--tenant-source annotation) is the operator's choice.
    _, client = serve(config_for(None, tenant_source="annotation"))
    assert sidecar_env(client.admit(pod("acme", **{"budgetwarden.io/tenant": "globex"})))["BUDGETWARDEN_TENANT"] == (
        "globex"
    )


def test_the_webhook_needs_no_redis_url_the_sidecars_read_the_conventional_secret(
    api: FakeApiServer, serve: Any
) -> None:
    # The webhook never connects to Redis: without --redis-url or --redis-url-secret, the sidecars take the URL from
    # the Secret budgetwarden-redis (key redis-url) of their own namespace, and that is what the namespace check wants.
    config = config_for(api, redis_url="", check_namespace_objects=True)
    assert config.redis_url_secret == "budgetwarden-redis:redis-url"
    api.put(policy_config_map("acme"))
    api.put(redis_secret("acme"))
    _, client = serve(config)
    env = sidecar_env(client.admit(pod("acme")))
    assert env["BUDGETWARDEN_REDIS_URL"] == {"secretKeyRef": {"name": "budgetwarden-redis", "key": "redis-url"}}
    # A URL given is still used as it is, and never both.
    assert config_for(None).redis_url_secret == ""
    with pytest.raises(Exception, match="not both"):
        config_for(None, redis_url_secret="other")


# --- what the namespace must hold ------------------------------------------------------------------------------------


def test_a_namespace_without_the_policy_configmap_is_refused_naming_it(api: FakeApiServer, serve: Any) -> None:
    _, client = serve(config_for(api, check_namespace_objects=True))
    refused = client.admit(pod("acme"))
    assert refused["allowed"] is False
    message = refused["status"]["message"]
    assert "namespace 'acme'" in message
    assert "ConfigMap 'budgetwarden-policy' with key 'policy.yaml'" in message
    assert "kubectl kustomize k8s/base/policy | kubectl apply -n acme -f -" in message
    assert ("GET", "/api/v1/namespaces/acme/configmaps/budgetwarden-policy") in api.requests
    # Created: the next pod is injected at once (a missing object is not remembered).
    api.put(policy_config_map("acme"))
    assert client.admit(pod("acme"))["allowed"] is True
    assert "patch" in client.admit(pod("acme"))


def test_a_configmap_without_the_policy_key_is_refused_naming_the_key(api: FakeApiServer, serve: Any) -> None:
    api.put(policy_config_map("acme", key="other.yaml"))
    _, client = serve(config_for(api, check_namespace_objects=True))
    refused = client.admit(pod("acme"))
    assert refused["allowed"] is False
    assert "key 'policy.yaml' in ConfigMap 'budgetwarden-policy'" in refused["status"]["message"]


def test_with_a_redis_secret_both_objects_are_checked_and_named(api: FakeApiServer, serve: Any) -> None:
    config = config_for(api, check_namespace_objects=True, redis_url="", redis_url_secret="budgetwarden-redis")
    _, client = serve(config)
    message = client.admit(pod("acme"))["status"]["message"]
    assert "ConfigMap 'budgetwarden-policy'" in message
    assert "Secret 'budgetwarden-redis' with key 'redis-url'" in message
    assert "kubectl -n acme create secret generic budgetwarden-redis --from-literal=redis-url=" in message
    api.put(policy_config_map("acme"))
    message = client.admit(pod("acme"))["status"]["message"]
    assert "ConfigMap" not in message
    assert "k8s/base/policy" not in message  # only the command for what is missing
    assert "Secret 'budgetwarden-redis'" in message
    api.put(redis_secret("acme"))
    assert client.admit(pod("acme"))["allowed"] is True


def test_a_check_the_api_cannot_answer_warns_and_injects(api: FakeApiServer, serve: Any, tmp_path: Path) -> None:
    api.forbidden.add("/api/v1/namespaces/acme/configmaps/budgetwarden-policy")
    _, client = serve(config_for(api, check_namespace_objects=True))
    answer = client.admit(pod("acme"))
    assert answer["allowed"] is True
    assert "patch" in answer
    assert any("could not check for ConfigMap 'budgetwarden-policy'" in w for w in answer["warnings"])
    # And an API server that is not there at all (a closed port) the same, within the webhook's timeout.
    unreachable = replace(config_for(api, check_namespace_objects=True), kube_api=f"https://127.0.0.1:{free_port()}")
    _, client = serve(unreachable)
    started = time.monotonic()
    answer = client.admit(pod("acme"))
    assert answer["allowed"] is True
    assert any("could not check" in w for w in answer["warnings"])
    assert time.monotonic() - started < WAIT_S  # a bound that only catches a hang


def test_an_api_server_that_never_answers_costs_a_warning_not_the_admission(api: FakeApiServer, serve: Any) -> None:
    # A port that accepts connections and then says nothing: each check waits its share of a 2.5 s budget, and the
    # pod is still answered (injected, with a warning) inside the API server's 5 s webhook timeout.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        config = config_for(
            api, check_namespace_objects=True, redis_url="", kube_api=f"https://127.0.0.1:{silent.getsockname()[1]}"
        )
        _, client = serve(config)
        answer = client.admit(pod("acme"))
    finally:
        silent.close()
    assert answer["allowed"] is True
    assert "patch" in answer
    warnings = " ".join(answer["warnings"])
    assert "ConfigMap 'budgetwarden-policy'" in warnings
    assert "Secret 'budgetwarden-redis'" in warnings


def test_a_complete_namespace_is_not_asked_again_for_each_pod(api: FakeApiServer, serve: Any) -> None:
    api.put(policy_config_map("acme"))
    _, client = serve(config_for(api, check_namespace_objects=True))
    for _ in range(3):
        assert client.admit(pod("acme"))["allowed"] is True
    gets = [r for r in api.requests if r[1].endswith("/configmaps/budgetwarden-policy")]
    assert len(gets) == 1


def test_the_api_is_needed_only_by_the_features_that_use_it(tmp_path: Path) -> None:
    assert kube_api(config_for(None), environ={}) is None
    with pytest.raises(Exception, match="KUBERNETES_SERVICE_HOST"):
        kube_api(config_for(None, check_namespace_objects=True), environ={})
    in_cluster = config_for(
        None, check_namespace_objects=True, kube_ca_file=Path(__file__).parent.parent / "missing-ca.crt"
    )
    with pytest.raises(Exception, match="--kube-ca-file"):
        kube_api(in_cluster, environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"})


# --- the self-signed caBundle ----------------------------------------------------------------------------------------


def webhook_configuration() -> dict[str, Any]:
    return find(rendered("overlays/self-signed"), "MutatingWebhookConfiguration", "budgetwarden-injector")


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def test_self_signed_injector_writes_its_ca_into_every_webhook_entry(api: FakeApiServer, serve: Any) -> None:
    configuration = webhook_configuration()
    assert all("caBundle" not in entry["clientConfig"] for entry in configuration["webhooks"])
    api.put(configuration)
    server, _ = serve(config_for(api, patch_webhook_ca="budgetwarden-injector"))
    bundle = server.certificates.ca_bundle

    def bundles() -> set[Any]:
        return {entry["clientConfig"].get("caBundle") for entry in api.get(configuration)["webhooks"]}

    wait_for(lambda: bundles() == {bundle}, "both entries trust the injector's CA")
    assert base64.b64decode(bundle).startswith(b"-----BEGIN CERTIFICATE-----")
    # A later `kubectl apply` of the manifests (no caBundle) resets one entry: the next check restores it.
    assert server.ca_bundle is not None
    stale = api.get(configuration)
    del stale["webhooks"][1]["clientConfig"]["caBundle"]
    api.put(stale)
    assert server.ca_bundle.sync() is True
    assert bundles() == {bundle}
    patches = [r for r in api.requests if r[0] == "PATCH"]
    assert len(patches) == 2  # one at start, one after the reset; none when nothing changed
    assert server.ca_bundle.sync() is True
    assert len([r for r in api.requests if r[0] == "PATCH"]) == 2


def test_ca_patching_fails_safe_and_needs_self_signed(api: FakeApiServer, serve: Any) -> None:
    with pytest.raises(Exception, match="--patch-webhook-ca"):
        config_for(api, self_signed=False, patch_webhook_ca="budgetwarden-injector")
    # No such configuration: the injector still serves, the sync reports failure, and nothing is written.
    server, client = serve(config_for(api, patch_webhook_ca="budgetwarden-injector"))
    assert server.ca_bundle is not None
    assert server.ca_bundle.sync() is False
    assert client.request("GET", "/readyz")[0] == 200


# --- metrics ---------------------------------------------------------------------------------------------------------


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition, parsed by prometheus_client's own parser."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no {name}{labels} in the exposition")


def test_the_webhook_exports_its_metrics(api: FakeApiServer, serve: Any) -> None:
    api.put(policy_config_map("acme"))
    _, client = serve(config_for(api, check_namespace_objects=True))
    status, body, content_type = client.request("GET", "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    text = body.decode()
    # Every series exists from the start, at 0.
    for result in ("injected", "updated", "skipped", "denied", "bad_request", "error"):
        assert metric_value(text, "budgetwarden_injector_admissions_total", route="/mutate", result=result) == 0
    assert metric_value(text, "budgetwarden_injector_namespace_checks_total", result="missing") == 0
    assert metric_value(text, "budgetwarden_injector_ca_bundle_syncs_total", result="failed") == 0
    assert metric_value(text, "budgetwarden_injector_ready") == 1
    client.admit(pod("acme"))
    client.admit(pod("globex"))  # no ConfigMap there: denied
    client.admit(pod("acme", **{"budgetwarden.io/inject": "false"}), path="/mutate")
    assert client.request("POST", "/mutate", b"not json")[0] == 400
    text = client.request("GET", "/metrics")[1].decode()
    admissions = "budgetwarden_injector_admissions_total"
    assert metric_value(text, admissions, route="/mutate-all", result="injected") == 1
    assert metric_value(text, admissions, route="/mutate-all", result="denied") == 1
    assert metric_value(text, admissions, route="/mutate", result="skipped") == 1
    assert metric_value(text, admissions, route="/mutate", result="bad_request") == 1
    assert metric_value(text, "budgetwarden_injector_admission_duration_seconds_count") == 4
    assert metric_value(text, "budgetwarden_injector_namespace_checks_total", result="complete") == 1
    assert metric_value(text, "budgetwarden_injector_namespace_checks_total", result="missing") == 1
