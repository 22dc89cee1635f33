"""The sidecar-injection webhook, over real HTTPS.

A real webhook server runs on a free port with a self-signed CA (and, for the reload test, a certificate pair on disk
laid out like a Kubernetes Secret volume). AdmissionReviews shaped like the API server's are posted to it with the CA
pinned and the Service's DNS name checked; returned patches are applied with ``jsonpatch`` and the pods validated
against the Kubernetes JSON schemas of a current release (``kubernetes-validate``) plus the API server's pod rules
that schemas cannot express (unique names, mounted volumes exist, restartPolicy only on init containers, ...).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import jsonpatch
import kubernetes_validate
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes_validate.utils import latest_version

from budgetwarden import inject
from budgetwarden.inject import InjectConfig, WebhookServer
from budgetwarden.inject._values import _quantity
from budgetwarden_client import BudgetClient, pb

from support import free_port, one_error_line
from support import run_cli as cli

SERVICE_DNS = "budgetwarden-injector.budgetwarden.svc"
K8S_LATEST = latest_version()
K8S_FIRST_NATIVE_SIDECARS = "1.29.0"  # SidecarContainers on by default (beta)
IMAGE = "registry.example.com/budgetwarden:0.1.0"
REDIS = "redis://redis.budgetwarden.svc:6379/0"


# --------------------------------------------------------------------------------------------------------------------
# A client that talks to the webhook the way the API server does: TLS to the Service's DNS name, CA from caBundle.


class Client:
    def __init__(self, port: int, ca_pem: bytes, server_name: str = SERVICE_DNS) -> None:
        self.port = port
        self.server_name = server_name
        self.context = ssl.create_default_context(cadata=ca_pem.decode())

    def connect(self) -> http.client.HTTPSConnection:
        port, context = self.port, self.context

        class Pinned(http.client.HTTPSConnection):
            def connect(self) -> None:
                raw = socket.create_connection(("127.0.0.1", port), timeout=30)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as Go's net/http does
                self.sock = context.wrap_socket(raw, server_hostname=self.host)

        return Pinned(self.server_name, port, timeout=30)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, http.client.HTTPResponse]:
        conn = self.connect()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read(), response
        finally:
            conn.close()

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        status, data, _ = self.request("POST", path, body, {"Content-Type": "application/json"})
        return status, data

    def peer_certificate(self) -> bytes:
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=30) as raw,
            self.context.wrap_socket(raw, server_hostname=self.server_name) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der


def start_server(config: InjectConfig, certificates: Any = None) -> WebhookServer:
    return WebhookServer(replace(config, listen=f"127.0.0.1:{free_port()}"), certificates).start()


# The tenant from the annotation (opted into; the default is the namespace, tests/integration/test_inject_api.py), so
# these tests can bind other tenants than the namespace.
BASE = InjectConfig(sidecar_image=IMAGE, redis_url=REDIS, log_format="text", tenant_source="annotation").validate()


@pytest.fixture(scope="module")
def webhook() -> Iterator[tuple[WebhookServer, Client]]:
    server = start_server(replace(BASE, self_signed=True))
    certs = server.certificates
    assert isinstance(certs, inject.SelfSignedCertificate)
    yield server, Client(server.port, certs.ca_cert_pem)
    server.stop()


LEGACY = replace(
    BASE,
    self_signed=True,
    legacy_sidecar=True,
    inject_all=True,
    redis_url="",
    redis_url_secret="budgetwarden-redis:url",
    redis_cluster=True,
    policy_configmap="",
    tenant_source="namespace",
    sidecar_metrics_port=9464,
    sidecar_env=(("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel-collector.budgetwarden:4317"),),
    sidecar_cpu_limit="500m",
)


@pytest.fixture(scope="module")
def legacy() -> Iterator[tuple[WebhookServer, Client]]:
    server = start_server(LEGACY.validate())
    certs = server.certificates
    assert isinstance(certs, inject.SelfSignedCertificate)
    yield server, Client(server.port, certs.ca_cert_pem)
    server.stop()


# --------------------------------------------------------------------------------------------------------------------
# Objects as the API server sends them: after defaulting and the built-in mutating admission plugins (ServiceAccount
# adds the kube-api-access volume and mounts, DefaultTolerationSeconds the tolerations, Priority the priority).


def _api_access_volume(suffix: str) -> dict[str, Any]:
    return {
        "name": f"kube-api-access-{suffix}",
        "projected": {
            "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {
                    "downwardAPI": {
                        "items": [
                            {"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
                        ]
                    }
                },
            ],
            "defaultMode": 420,
        },
    }


def _api_access_mount(suffix: str) -> dict[str, Any]:
    return {
        "name": f"kube-api-access-{suffix}",
        "readOnly": True,
        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
    }


def _container(name: str, image: str, **extra: Any) -> dict[str, Any]:
    container = {
        "name": name,
        "image": image,
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    }
    container.update(extra)
    return container


def _spec(**extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "default",
        "serviceAccount": "default",
        "securityContext": {},
        "schedulerName": "default-scheduler",
        "tolerations": [
            {
                "key": "node.kubernetes.io/not-ready",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            },
            {
                "key": "node.kubernetes.io/unreachable",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            },
        ],
        "priority": 0,
        "enableServiceLinks": True,
        "preemptionPolicy": "PreemptLowerPriority",
    }
    spec.update(extra)
    return spec


def deployment_pod(annotations: dict[str, str] | None = None, namespace: str = "agents") -> dict[str, Any]:
    """A pod as a ReplicaSet creates it: generateName, no name yet, owner reference, one agent container."""
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "generateName": "research-agent-7d9f8c6b5d-",
            "namespace": namespace,
            "labels": {"app": "research-agent", "pod-template-hash": "7d9f8c6b5d"},
            "annotations": {"budgetwarden.io/inject": "true", "budgetwarden.io/tenant": "acme"}
            if annotations is None
            else annotations,
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "research-agent-7d9f8c6b5d",
                    "uid": "0b6c2f1e-3f0e-4c54-9d7b-2a1e8f6c9d10",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "managedFields": [
                {
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": "2025-06-01T10:00:00Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:metadata": {"f:generateName": {}}},
                }
            ],
        },
        "spec": _spec(
            volumes=[_api_access_volume("x7k2p")],
            containers=[
                _container(
                    "agent",
                    "registry.example.com/research-agent:2.3.1",
                    ports=[{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    env=[{"name": "MODEL", "value": "gpt-4.1"}],
                    resources={"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
                    volumeMounts=[_api_access_mount("x7k2p")],
                )
            ],
        ),
        "status": {},
    }


def busy_pod() -> dict[str, Any]:
    """Init containers (a regular one and a native log-shipper sidecar), two app containers, an emptyDir, and one
    container that already sets BUDGETWARDEN_ADDR (a shared budgetwarden it wants to keep)."""
    pod = deployment_pod({"budgetwarden.io/inject": "true", "budgetwarden.io/tenant": "acme"})
    spec = pod["spec"]
    spec["volumes"].append({"name": "scratch", "emptyDir": {}})
    spec["initContainers"] = [
        _container("migrate", "registry.example.com/migrate:1", command=["/migrate", "--up"]),
        _container("log-shipper", "registry.example.com/shipper:3", restartPolicy="Always"),
    ]
    spec["containers"].append(
        _container(
            "tools",
            "registry.example.com/tools:5",
            env=[{"name": "BUDGETWARDEN_ADDR", "value": "budgetwarden.shared:50151"}],
            volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}, _api_access_mount("x7k2p")],
        )
    )
    return pod


def bare_pod(namespace: str = "agents", **annotations: str) -> dict[str, Any]:
    """``kubectl run`` style with automountServiceAccountToken: false: no volumes, no env, no init containers."""
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": "triage",
            "namespace": namespace,
            "labels": {"run": "triage"},
            **({"annotations": dict(annotations)} if annotations else {}),
        },
        "spec": _spec(
            automountServiceAccountToken=False,
            containers=[_container("triage", "registry.example.com/triage:1")],
        ),
        "status": {},
    }


def review(
    pod: Any,
    namespace: str | None = None,
    operation: str = "CREATE",
    resource: dict[str, str] | None = None,
    uid: str | None = None,
) -> dict[str, Any]:
    ns = namespace if namespace is not None else pod["metadata"].get("namespace", "default")
    request: dict[str, Any] = {
        "uid": uid or str(uuid.uuid4()),
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": resource or {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": resource or {"group": "", "version": "v1", "resource": "pods"},
        "name": pod["metadata"].get("name", "") if isinstance(pod, dict) else "",
        "namespace": ns,
        "operation": operation,
        "userInfo": {
            "username": "system:serviceaccount:kube-system:replicaset-controller",
            "uid": "6b1c1a4e-2e0b-4f1d-8a40-3c9f5a2b7e61",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"],
        },
        "object": pod,
        "oldObject": None,
        "dryRun": False,
        "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
    }
    return {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": request}


def admit(client: Client, payload: dict[str, Any], path: str = "/mutate") -> dict[str, Any]:
    """POST a review (as the API server does, with ?timeout=); the response, checked for shape and uid."""
    status, body = client.post(path + "?timeout=10s", json.dumps(payload).encode())
    assert status == 200, body
    answer = json.loads(body)
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    response: dict[str, Any] = answer["response"]
    assert response["uid"] == payload["request"]["uid"]
    assert isinstance(response["allowed"], bool)
    if "patch" in response:
        assert response["patchType"] == "JSONPatch"
    else:
        assert "patchType" not in response
    return response


def patched(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    ops = json.loads(base64.b64decode(response["patch"]))
    result: dict[str, Any] = jsonpatch.JsonPatch(ops).apply(copy.deepcopy(pod))
    return result


# --------------------------------------------------------------------------------------------------------------------
# What the API server would check.


def validate_pod(pod: dict[str, Any], versions: tuple[str, ...] = (K8S_LATEST, K8S_FIRST_NATIVE_SIDECARS)) -> None:
    for version in versions:
        try:
            kubernetes_validate.validate(pod, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"Kubernetes {version} schema: {str(exc).splitlines()[0]}") from None
    api_server_rules(pod)


FIELD_PATHS = {"metadata.name", "metadata.namespace", "metadata.uid", "spec.nodeName", "spec.serviceAccountName"}


def api_server_rules(pod: dict[str, Any]) -> None:
    """The parts of the API server's pod validation that JSON schemas do not carry."""
    spec = pod["spec"]
    init, regular = spec.get("initContainers", []), spec["containers"]
    names = [c["name"] for c in init + regular]
    assert len(names) == len(set(names)), f"duplicate container names: {names}"
    volumes = [v["name"] for v in spec.get("volumes", [])]
    assert len(volumes) == len(set(volumes)), f"duplicate volume names: {volumes}"
    for container in init + regular:
        mounts = container.get("volumeMounts", [])
        for mount in mounts:
            assert mount["name"] in volumes, f"{container['name']} mounts missing volume {mount['name']}"
        paths = [m["mountPath"] for m in mounts]
        assert len(paths) == len(set(paths)), f"{container['name']}: duplicate mount paths"
        env_names = [e["name"] for e in container.get("env", [])]
        assert len(env_names) == len(set(env_names)), f"{container['name']}: duplicate env {env_names}"
        for entry in container.get("env", []):
            assert ("value" in entry) != ("valueFrom" in entry) or entry.get("value") == "", entry
            ref = entry.get("valueFrom", {}).get("fieldRef")
            if ref:
                assert ref["fieldPath"] in FIELD_PATHS, ref
        resources = container.get("resources", {})
        for resource, request in resources.get("requests", {}).items():
            limit = resources.get("limits", {}).get(resource)
            if limit is not None:
                low, high = _quantity(request), _quantity(limit)
                assert low is not None
                assert high is not None
                assert low <= high, f"{container['name']}: {resource} request {request} above limit {limit}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in container and "grpc" in container[probe]:
                assert 1 <= container[probe]["grpc"]["port"] <= 65535
        security = container.get("securityContext", {})
        if security.get("runAsNonRoot"):
            assert security.get("runAsUser", 1) != 0
    for container in regular:
        assert "restartPolicy" not in container, f"{container['name']}: restartPolicy on a regular container"
    for container in init:
        sidecar = container.get("restartPolicy") == "Always"
        assert container.get("restartPolicy") in (None, "Always"), container["name"]
        if not sidecar:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe", "lifecycle"):
                assert probe not in container, f"{container['name']}: {probe} on a regular init container"


def sidecar_of(pod: dict[str, Any]) -> dict[str, Any]:
    found = [
        c for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"] if c["name"] == "budgetwarden"
    ]
    assert len(found) == 1, [c["name"] for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]]
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def arg_after(container: dict[str, Any], flag: str) -> str | None:
    args = container["args"]
    return args[args.index(flag) + 1] if flag in args else None


# --------------------------------------------------------------------------------------------------------------------
# Injection.


def test_deployment_pod_gets_a_native_sidecar_that_validates(webhook: tuple[WebhookServer, Client]) -> None:
    _, client = webhook
    pod = deployment_pod()
    validate_pod(pod)
    response = admit(client, review(pod))
    assert response["allowed"] is True
    assert "warnings" not in response
    result = patched(pod, response)
    validate_pod(result)

    assert result["metadata"]["annotations"]["budgetwarden.io/status"] == "injected"
    assert result["metadata"]["annotations"]["budgetwarden.io/tenant"] == "acme"
    (sidecar,) = result["spec"]["initContainers"]
    assert sidecar["name"] == "budgetwarden"
    assert sidecar["restartPolicy"] == "Always", "a native sidecar"
    assert sidecar["image"] == IMAGE
    assert sidecar["command"] == ["budgetwarden"]
    assert sidecar["args"][0] == "serve"
    assert arg_after(sidecar, "--listen") == "127.0.0.1:50151", "the budget API stays on loopback"
    assert arg_after(sidecar, "--health-listen") == "0.0.0.0:50160", "health where the kubelet reaches it"
    assert arg_after(sidecar, "--policy-file") == "/etc/budgetwarden/policy/policy.yaml"
    assert arg_after(sidecar, "--fail-mode") == "closed"
    assert arg_after(sidecar, "--log-level") == "INFO"
    assert "--redis-url" not in sidecar["args"], "the URL (it may hold a password) travels only in env"
    assert sidecar["readinessProbe"]["grpc"] == {"port": 50160}  # "": not ready while Redis does not answer
    for probe in ("startupProbe", "livenessProbe"):  # never restarted for a Redis outage
        assert sidecar[probe]["grpc"] == {"port": 50160, "service": "liveness"}
    assert sidecar["startupProbe"]["periodSeconds"] == 1
    env = env_of(sidecar)
    assert env["BUDGETWARDEN_TENANT"] == "acme"
    assert env["BUDGETWARDEN_REDIS_URL"] == REDIS
    assert "BUDGETWARDEN_DEFAULT_TASK_TYPE" not in env
    assert env["POD_NAME"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
    assert env["NODE_NAME"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}
    assert sidecar["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert sidecar["volumeMounts"] == [
        {"name": "budgetwarden-policy", "mountPath": "/etc/budgetwarden/policy", "readOnly": True}
    ]
    volumes = {v["name"]: v for v in result["spec"]["volumes"]}
    assert volumes["budgetwarden-policy"]["configMap"]["name"] == "budgetwarden-policy"
    assert "kube-api-access-x7k2p" in volumes, "existing volumes are kept"
    (agent,) = result["spec"]["containers"]
    assert agent["env"] == [
        {"name": "MODEL", "value": "gpt-4.1"},
        {"name": "BUDGETWARDEN_ADDR", "value": "127.0.0.1:50151"},
    ]
    # Nothing else about the app container changed.
    original = deployment_pod()["spec"]["containers"][0]
    assert {k: v for k, v in agent.items() if k != "env"} == {k: v for k, v in original.items() if k != "env"}


def test_reinvocation_of_an_injected_pod_is_a_no_op(webhook: tuple[WebhookServer, Client]) -> None:
    _, client = webhook
    pod = patched(deployment_pod(), admit(client, review(deployment_pod())))
    again = admit(client, review(pod))
    assert again["allowed"] is True
    assert "patch" not in again
    assert again["status"]["message"] == "already injected"
    # And on the inject-all route too.
    assert "patch" not in admit(client, review(pod), "/mutate-all")


def test_reinvocation_after_another_webhook_added_a_container(webhook: tuple[WebhookServer, Client]) -> None:
    """reinvocationPolicy: IfNeeded: a container added by a later webhook gets BUDGETWARDEN_ADDR, nothing else."""
    _, client = webhook
    pod = patched(deployment_pod(), admit(client, review(deployment_pod())))
    pod["spec"]["containers"].append(_container("metrics-agent", "registry.example.com/metrics:1"))
    response = admit(client, review(pod))
    result = patched(pod, response)
    validate_pod(result)
    assert env_of(result["spec"]["containers"][1]) == {"BUDGETWARDEN_ADDR": "127.0.0.1:50151"}
    assert len(result["spec"]["initContainers"]) == 1
    assert "patch" not in admit(client, review(result))


def test_existing_init_containers_volumes_and_env_are_respected(webhook: tuple[WebhookServer, Client]) -> None:
    _, client = webhook
    pod = busy_pod()
    validate_pod(pod)
    response = admit(client, review(pod))
    ops = json.loads(base64.b64decode(response["patch"]))
    paths = [op["path"] for op in ops]
    assert "/spec/initContainers/-" in paths, "appended to the existing list, not replacing it"
    assert "/spec/volumes/-" in paths
    assert "/metadata/annotations/budgetwarden.io~1status" in paths, "the key's / is escaped as ~1"
    result = patched(pod, response)
    validate_pod(result)
    init = [c["name"] for c in result["spec"]["initContainers"]]
    assert init == ["migrate", "log-shipper", "budgetwarden"], "last: after the existing init containers and sidecars"
    assert result["spec"]["initContainers"][:2] == pod["spec"]["initContainers"]
    assert [v["name"] for v in result["spec"]["volumes"]] == ["kube-api-access-x7k2p", "scratch", "budgetwarden-policy"]
    agent, tools = result["spec"]["containers"]
    assert env_of(agent)["BUDGETWARDEN_ADDR"] == "127.0.0.1:50151"
    assert tools["env"] == [{"name": "BUDGETWARDEN_ADDR", "value": "budgetwarden.shared:50151"}], "never overwritten"
    assert "patch" not in admit(client, review(result))


def test_pod_without_volumes_env_or_annotations_block(webhook: tuple[WebhookServer, Client]) -> None:
    """Absent arrays and maps are added whole; present ones are appended to."""
    _, client = webhook
    pod = bare_pod()
    validate_pod(pod)
    # No annotations at all: only the inject-all route injects it.
    assert "patch" not in admit(client, review(pod))
    response = admit(client, review(pod), "/mutate-all")
    ops = json.loads(base64.b64decode(response["patch"]))
    by_path = {op["path"]: op["value"] for op in ops}
    assert by_path["/metadata/annotations"] == {"budgetwarden.io/status": "injected"}
    assert by_path["/spec/volumes"][0]["name"] == "budgetwarden-policy"
    assert by_path["/spec/containers/0/env"] == [{"name": "BUDGETWARDEN_ADDR", "value": "127.0.0.1:50151"}]
    assert by_path["/spec/initContainers"][0]["name"] == "budgetwarden"
    result = patched(pod, response)
    validate_pod(result)
    assert env_of(sidecar_of(result))["BUDGETWARDEN_TENANT"] == "agents", "no tenant annotation: the namespace"


def test_annotations_set_tenant_task_type_resources_fail_mode_and_log_level(
    webhook: tuple[WebhookServer, Client],
) -> None:
    _, client = webhook
    pod = deployment_pod(
        {
            "budgetwarden.io/inject": "True",
            "budgetwarden.io/tenant": "team-research",
            "budgetwarden.io/task-type": "research",
            "budgetwarden.io/cpu": "100m",
            "budgetwarden.io/cpu-limit": "1",
            "budgetwarden.io/memory": "128Mi",
            "budgetwarden.io/memory-limit": "512Mi",
            "budgetwarden.io/fail-mode": "open",
            "budgetwarden.io/log-level": "debug",
        }
    )
    result = patched(pod, admit(client, review(pod)))
    validate_pod(result)
    sidecar = sidecar_of(result)
    env = env_of(sidecar)
    assert env["BUDGETWARDEN_TENANT"] == "team-research"
    assert env["BUDGETWARDEN_DEFAULT_TASK_TYPE"] == "research"
    assert sidecar["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "1", "memory": "512Mi"},
    }
    assert arg_after(sidecar, "--fail-mode") == "open"
    assert arg_after(sidecar, "--log-level") == "DEBUG"


def test_a_lower_memory_limit_alone_lowers_the_default_request(webhook: tuple[WebhookServer, Client]) -> None:
    _, client = webhook
    pod = deployment_pod({"budgetwarden.io/inject": "true", "budgetwarden.io/memory-limit": "48Mi"})
    result = patched(pod, admit(client, review(pod)))
    validate_pod(result)
    assert sidecar_of(result)["resources"]["requests"]["memory"] == "48Mi"


@pytest.mark.parametrize(
    ("annotations", "named"),
    [
        ({"budgetwarden.io/cpu": "lots"}, "budgetwarden.io/cpu"),
        ({"budgetwarden.io/memory": "-64Mi"}, "budgetwarden.io/memory"),
        ({"budgetwarden.io/memory": "1Gi", "budgetwarden.io/memory-limit": "512Mi"}, "budgetwarden.io/memory"),
        ({"budgetwarden.io/fail-mode": "sometimes"}, "budgetwarden.io/fail-mode"),
        ({"budgetwarden.io/log-level": "chatty"}, "budgetwarden.io/log-level"),
        ({"budgetwarden.io/tenant": ""}, "budgetwarden.io/tenant"),
        ({"budgetwarden.io/tenant": "a\nb"}, "budgetwarden.io/tenant"),
        ({"budgetwarden.io/tenant": "x" * 300}, "budgetwarden.io/tenant"),
        ({"budgetwarden.io/task-type": "t\x00"}, "budgetwarden.io/task-type"),
    ],
)
def test_an_invalid_annotation_denies_the_pod_naming_it(
    webhook: tuple[WebhookServer, Client], annotations: dict[str, str], named: str
) -> None:
    _, client = webhook
    pod = deployment_pod({"budgetwarden.io/inject": "true", **annotations})
    response = admit(client, review(pod))
    assert response["allowed"] is False
    assert "patch" not in response
    assert response["status"]["code"] == 400
    assert named + ":" in response["status"]["message"]


def test_opt_out_wins_everywhere(webhook: tuple[WebhookServer, Client]) -> None:
    _, client = webhook
    for path in ("/mutate", "/mutate-all"):
        pod = deployment_pod({"budgetwarden.io/inject": "false", "budgetwarden.io/tenant": "acme"})
        response = admit(client, review(pod), path)
        assert response["allowed"] is True
        assert "patch" not in response
        assert response["status"]["message"] == "the pod opted out"
    # A label saying false beats an annotation saying true.
    pod = deployment_pod()
    pod["metadata"]["labels"]["budgetwarden.io/inject"] = "false"
    assert "patch" not in admit(client, review(pod), "/mutate-all")


def test_the_inject_label_opts_in_too(webhook: tuple[WebhookServer, Client]) -> None:
    """A pod label lets the MutatingWebhookConfiguration's objectSelector send only opted-in pods."""
    _, client = webhook
    pod = bare_pod()
    pod["metadata"]["labels"]["budgetwarden.io/inject"] = "true"
    validate_pod(patched(pod, admit(client, review(pod))))


def test_other_namespaces_are_injected_only_on_request(webhook: tuple[WebhookServer, Client]) -> None:
    _, client = webhook
    pod = deployment_pod({}, namespace="payments")
    response = admit(client, review(pod))
    assert "patch" not in response
    assert "not requested" in response["status"]["message"]
    assert "warnings" not in response
    # The same pod in a namespace labelled budgetwarden.io/inject=enabled (routed to /mutate-all):
    result = patched(pod, admit(client, review(pod), "/mutate-all"))
    validate_pod(result)
    assert env_of(sidecar_of(result))["BUDGETWARDEN_TENANT"] == "payments"


@pytest.mark.parametrize("namespace", ["budgetwarden", "kube-system"])
def test_own_and_system_namespaces_are_never_injected(webhook: tuple[WebhookServer, Client], namespace: str) -> None:
    _, client = webhook
    for path in ("/mutate", "/mutate-all"):
        response = admit(client, review(deployment_pod(namespace=namespace)), path)
        assert response["allowed"] is True
        assert "patch" not in response
        assert "never injected" in response["status"]["message"]


def test_an_existing_budgetwarden_container_is_not_doubled(webhook: tuple[WebhookServer, Client]) -> None:
    _, client = webhook
    pod = deployment_pod()
    pod["spec"]["containers"].append(_container("budgetwarden", "budgetwarden:0.0.9", args=["serve"]))
    response = admit(client, review(pod))
    assert response["allowed"] is True
    assert "patch" not in response
    assert any("already has a container named 'budgetwarden'" in w for w in response["warnings"])


def test_a_status_annotation_without_a_sidecar_is_reported_not_injected(webhook: tuple[WebhookServer, Client]) -> None:
    _, client = webhook
    pod = deployment_pod({"budgetwarden.io/inject": "true", "budgetwarden.io/status": "injected"})
    response = admit(client, review(pod))
    assert "patch" not in response
    assert any("remove the annotation" in w for w in response["warnings"])


def test_host_network_pods_are_skipped_with_a_warning(webhook: tuple[WebhookServer, Client]) -> None:
    _, client = webhook
    pod = deployment_pod()
    pod["spec"]["hostNetwork"] = True
    response = admit(client, review(pod))
    assert "patch" not in response
    assert any("hostNetwork" in w for w in response["warnings"])


def test_unknown_annotations_and_values_warn(webhook: tuple[WebhookServer, Client]) -> None:
    _, client = webhook
    pod = deployment_pod({"budgetwarden.io/inject": "true", "budgetwarden.io/tennant": "acme"})
    response = admit(client, review(pod))
    assert "patch" in response
    assert any("budgetwarden.io/tennant" in w for w in response["warnings"])
    pod = deployment_pod({"budgetwarden.io/inject": "maybe"})
    response = admit(client, review(pod))
    assert "patch" not in response
    assert any("'maybe'" in w for w in response["warnings"])


def test_an_existing_policy_volume_is_used_not_doubled(webhook: tuple[WebhookServer, Client]) -> None:
    _, client = webhook
    pod = deployment_pod()
    pod["spec"]["volumes"].append({"name": "budgetwarden-policy", "configMap": {"name": "my-team-policy"}})
    result = patched(pod, admit(client, review(pod)))
    validate_pod(result)
    (volume,) = [v for v in result["spec"]["volumes"] if v["name"] == "budgetwarden-policy"]
    assert volume["configMap"]["name"] == "my-team-policy"


def test_concurrent_reviews_on_kept_alive_connections(webhook: tuple[WebhookServer, Client]) -> None:
    """The API server keeps connections open and sends many reviews at once."""
    _, client = webhook

    def several(_: int) -> list[bool]:
        conn = client.connect()
        seen = []
        try:
            for _ in range(5):
                payload = review(deployment_pod())
                conn.request(
                    "POST", "/mutate?timeout=10s", json.dumps(payload).encode(), {"Content-Type": "application/json"}
                )
                answer = json.loads(conn.getresponse().read())["response"]
                seen.append(answer["uid"] == payload["request"]["uid"] and "patch" in answer)
        finally:
            conn.close()
        return seen

    with ThreadPoolExecutor(8) as pool:
        results = [ok for batch in pool.map(several, range(16)) for ok in batch]
    assert results == [True] * 80


# --------------------------------------------------------------------------------------------------------------------
# Legacy sidecars, Redis from a Secret, tenant bound to the namespace, extra env.


def test_legacy_sidecar_is_a_regular_container(legacy: tuple[WebhookServer, Client]) -> None:
    _, client = legacy
    pod = busy_pod()
    del pod["metadata"]["annotations"]["budgetwarden.io/tenant"]
    response = admit(client, review(pod))
    result = patched(pod, response)
    validate_pod(result, (K8S_LATEST, "1.28.0"))
    assert [c["name"] for c in result["spec"]["containers"]] == ["agent", "tools", "budgetwarden"]
    assert [c["name"] for c in result["spec"]["initContainers"]] == ["migrate", "log-shipper"]
    sidecar = sidecar_of(result)
    assert "restartPolicy" not in sidecar
    env = env_of(sidecar)
    assert env["BUDGETWARDEN_REDIS_URL"] == {"secretKeyRef": {"name": "budgetwarden-redis", "key": "url"}}
    assert env["BUDGETWARDEN_REDIS_CLUSTER"] == "true"
    assert env["BUDGETWARDEN_TENANT"] == "agents", "--tenant-source namespace"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.budgetwarden:4317"
    assert arg_after(sidecar, "--metrics-port") == "9464"
    assert arg_after(sidecar, "--metrics-host") == "0.0.0.0"  # scraped on the pod IP; the sidecar's default is loopback
    assert "--policy-file" not in sidecar["args"], "--policy-configmap '': the built-in policy, no volume"
    assert "volumeMounts" not in sidecar
    assert sidecar["resources"]["limits"] == {"cpu": "500m", "memory": "256Mi"}
    assert not any(v["name"] == "budgetwarden-policy" for v in result["spec"]["volumes"])
    assert "patch" not in admit(client, review(result))


def test_namespace_bound_tenant_refuses_another_tenant(legacy: tuple[WebhookServer, Client]) -> None:
    _, client = legacy
    pod = bare_pod(**{"budgetwarden.io/tenant": "someone-else"})
    response = admit(client, review(pod))
    assert response["allowed"] is False
    assert "binds every pod to its namespace" in response["status"]["message"]
    # Naming its own namespace is fine; --inject-all injects it without an inject annotation.
    pod = bare_pod(**{"budgetwarden.io/tenant": "agents"})
    validate_pod(patched(pod, admit(client, review(pod))), (K8S_LATEST, "1.28.0"))


# --------------------------------------------------------------------------------------------------------------------
# Bad reviews: a clear answer each, and the server keeps serving.


def _good_review_still_injects(client: Client) -> None:
    status, body, _ = client.request("GET", "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert "patch" in admit(client, review(deployment_pod()))


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (b"[1, 2]", "got a JSON list"),
        (b"", "not JSON"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "Pod"}).encode(), "kind 'Pod'"),
        (json.dumps({"kind": "AdmissionReview"}).encode(), "no apiVersion"),
        (
            json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {}}).encode(),
            "admissionReviewVersions",
        ),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(), "no request"),
        (
            json.dumps(
                {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": ""}}
            ).encode(),
            "no uid",
        ),
    ],
)
def test_unanswerable_bodies_get_400_with_a_message(
    webhook: tuple[WebhookServer, Client], body: bytes, says: str
) -> None:
    _, client = webhook
    status, answer = client.post("/mutate", body)
    assert status == 400
    assert says in answer.decode()
    assert answer.decode().count("\n") == 1, "one line"
    _good_review_still_injects(client)


def test_well_formed_reviews_it_does_not_change_are_allowed_with_a_reason(
    webhook: tuple[WebhookServer, Client],
) -> None:
    _, client = webhook
    deployment = {"group": "apps", "version": "v1", "resource": "deployments"}
    cases: list[tuple[dict[str, Any], str, bool]] = [
        (review(deployment_pod(), resource=deployment), "not a pod", True),
        (review(deployment_pod(), operation="UPDATE"), "only CREATE", True),
        (review(deployment_pod(), operation="CONNECT"), "only CREATE", True),
    ]
    delete = review(deployment_pod(), operation="DELETE")
    delete["request"]["oldObject"], delete["request"]["object"] = delete["request"]["object"], None
    cases.append((delete, "only CREATE", True))
    no_object = review(deployment_pod())
    del no_object["request"]["object"]
    cases.append((no_object, "request.object is missing", True))
    cases.append((review("a string, not a pod", namespace="agents"), "request.object is missing", True))
    no_containers = deployment_pod()
    del no_containers["spec"]["containers"]
    cases.append((review(no_containers), "no metadata or spec.containers", False))
    exec_sub = review(deployment_pod())
    exec_sub["request"]["subResource"] = "exec"
    cases.append((exec_sub, "subresource", False))
    for payload, says, warns in cases:
        response = admit(client, payload)
        assert response["allowed"] is True
        assert "patch" not in response
        assert says in response["status"]["message"]
        assert ("warnings" in response) is warns, response
    _good_review_still_injects(client)


def test_http_level_mistakes_and_broken_connections(webhook: tuple[WebhookServer, Client]) -> None:
    server, client = webhook
    assert client.request("GET", "/mutate")[0] == 405
    assert client.request("POST", "/validate", b"{}")[0] == 404
    assert client.request("GET", "/")[0] == 404
    status, body, _ = client.request("GET", "/readyz")
    assert (status, body) == (200, b"ok\n")
    # A body announced as too large is refused before it is read.
    conn = client.connect()
    conn.putrequest("POST", "/mutate")
    conn.putheader("Content-Length", str(64 * 1024 * 1024))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    # Chunked bodies are refused (the API server always sends Content-Length).
    conn = client.connect()
    conn.request("POST", "/mutate", body=iter([b"{}"]), encode_chunked=True)
    assert conn.getresponse().status == 411
    conn.close()
    # Plain HTTP to the TLS port, a client that connects and says nothing, and a TLS client that gives up mid-body.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        raw.sendall(b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := raw.recv(4096):
                received += chunk
        assert not received.startswith(b"HTTP/"), "plain HTTP is never answered on the TLS port"
    socket.create_connection(("127.0.0.1", server.port), timeout=30).close()
    conn = client.connect()
    conn.putrequest("POST", "/mutate")
    conn.putheader("Content-Length", "1000")
    conn.endheaders()
    conn.send(b'{"apiVersion": ')
    conn.close()
    # A client that does not trust the CA fails its handshake; the server does not care.
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(server.port, inject.generate_ca()[0]).peer_certificate()
    _good_review_still_injects(client)


CHUNK = b"400\r\n" + b"x" * 1024 + b"\r\n"  # 1 KiB, chunked


@pytest.mark.parametrize(
    ("head", "piece", "status"),
    [
        (b"POST /mutate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", CHUNK, 411),
        (b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: 67108864\r\n\r\n", b"x" * 1024, 413),
        (b"POST /validate HTTP/1.1\r\nHost: x\r\nContent-Length: 65536\r\n\r\n", b"x" * 1024, 404),
    ],
)
def test_a_client_may_finish_sending_a_body_the_answer_refused(
    webhook: tuple[WebhookServer, Client], head: bytes, piece: bytes, status: int
) -> None:
    """The server answers before it reads the body, then reads and drops what the client still sends before it
    closes: a close with unread data would reset the connection, failing the client's write of its body or destroying
    the answer before the client read it. Here the whole answer comes first, then 64 KiB of body: no reset, whatever
    the timing."""
    server, client = webhook
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw,
        client.context.wrap_socket(raw, server_hostname=client.server_name) as tls,
    ):
        tls.sendall(head)
        answer = http.client.HTTPResponse(tls)
        answer.begin()
        assert (answer.status, answer.getheader("Connection")) == (status, "close")
        answer.read()
        for _ in range(64):
            tls.sendall(piece)


# --------------------------------------------------------------------------------------------------------------------
# Certificates.


def _secret_volume(directory: Path, cert_pem: bytes, key_pem: bytes, version: str) -> None:
    """Write tls.crt/tls.key the way the kubelet updates a Secret volume: a new timestamped directory, then an atomic
    swap of the ..data symlink (tls.crt -> ..data/tls.crt never changes)."""
    data = directory / f"..{version}"
    data.mkdir()
    (data / "tls.crt").write_bytes(cert_pem)
    (data / "tls.key").write_bytes(key_pem)
    (data / "tls.key").chmod(0o600)
    link = directory / "..data_tmp"
    link.symlink_to(data.name)
    os.replace(link, directory / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


def _der(cert_pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert_pem.decode())


def test_certificate_files_are_reloaded_for_new_connections(tmp_path: Path) -> None:
    ca_a, ca_a_key = inject.generate_ca("old-ca")
    ca_b, ca_b_key = inject.generate_ca("new-ca")  # cert-manager may rotate the CA as well
    cert_a, key_a = inject.issue_serving_certificate(ca_a, ca_a_key, [SERVICE_DNS])
    cert_b, key_b = inject.issue_serving_certificate(ca_b, ca_b_key, [SERVICE_DNS])
    secret = tmp_path / "tls"
    secret.mkdir()
    _secret_volume(secret, cert_a, key_a, "2025_06_01_10_00_00.1")
    config = replace(BASE, tls_cert_file=secret / "tls.crt", tls_key_file=secret / "tls.key", cert_reload_seconds=0.05)
    server = start_server(config)
    try:
        client = Client(server.port, ca_a + ca_b)
        assert client.peer_certificate() == _der(cert_a)
        kept = client.connect()
        kept.request("GET", "/healthz")
        assert kept.getresponse().read() == b"ok\n"

        _secret_volume(secret, cert_b, key_b, "2025_06_02_10_00_00.2")
        deadline = time.monotonic() + 60
        while client.peer_certificate() != _der(cert_b):
            assert time.monotonic() < deadline, "the new certificate was never served"
            time.sleep(0.05)
        # A connection from before the swap goes on with the certificate it was opened with.
        kept.request("GET", "/healthz")
        assert kept.getresponse().read() == b"ok\n"
        kept.close()
        # Only the new CA is needed now; the webhook still answers.
        assert "patch" in admit(Client(server.port, ca_b), review(deployment_pod()))

        # A broken update (the key of another certificate) is not loaded: the working pair stays.
        cert_c, _ = inject.issue_serving_certificate(ca_b, ca_b_key, [SERVICE_DNS])
        _secret_volume(secret, cert_c, key_a, "2025_06_03_10_00_00.3")
        server.certificates.poll()
        assert client.peer_certificate() == _der(cert_b)
        _good_review_still_injects(Client(server.port, ca_b))
    finally:
        server.stop()


def test_self_signed_certificate_names_the_service_and_is_a_server_cert(webhook: tuple[WebhookServer, Client]) -> None:
    server, client = webhook
    cert = x509.load_der_x509_certificate(client.peer_certificate())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == [
        "budgetwarden-injector",
        "budgetwarden-injector.budgetwarden",
        "budgetwarden-injector.budgetwarden.svc",
        "budgetwarden-injector.budgetwarden.svc.cluster.local",
    ]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    # The caBundle is the base64 of the CA's PEM.
    certs = server.certificates
    assert isinstance(certs, inject.SelfSignedCertificate)
    assert base64.b64decode(certs.ca_bundle).startswith(b"-----BEGIN CERTIFICATE-----")
    # A name the certificate does not carry is refused by a verifying client.
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(server.port, certs.ca_cert_pem, "budgetwarden-injector.elsewhere.svc").peer_certificate()


def test_pointer_escapes_tilde_and_slash() -> None:
    assert inject.pointer("metadata", "annotations", "example.com/a~b") == "/metadata/annotations/example.com~1a~0b"
    assert inject.pointer("spec", "containers", 3, "env", "-") == "/spec/containers/3/env/-"


# --------------------------------------------------------------------------------------------------------------------
# The command.

INJECT_FLAGS = ("--sidecar-image", IMAGE, "--redis-url", REDIS)


def test_cli_help_lists_flags_and_environment() -> None:
    result = cli("inject-webhook", "--help")
    assert result.returncode == 0
    for text in (
        "--sidecar-image",
        "BUDGETWARDEN_INJECT_SIDECAR_IMAGE",
        "--legacy-sidecar",
        "--inject-all",
        "--self-signed",
        "--print-ca-bundle",
        "/mutate-all",
        "--redis-url-secret",
    ):
        assert text in result.stdout


def test_cli_missing_certificate_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "tls.crt"
    result = cli(
        "inject-webhook",
        *INJECT_FLAGS,
        "--listen",
        "127.0.0.1:0",
        "--tls-cert-file",
        str(missing),
        "--tls-key-file",
        str(tmp_path / "nowhere" / "tls.key"),
    )
    assert result.returncode == 1
    line = one_error_line(result)
    assert line.startswith("budgetwarden inject-webhook: error: ")
    assert str(missing) in line
    assert "No such file" in line


def test_cli_mismatched_pair_is_one_line(tmp_path: Path) -> None:
    ca, ca_key = inject.generate_ca()
    cert, _ = inject.issue_serving_certificate(ca, ca_key, [SERVICE_DNS])
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(ca_key)
    result = cli(
        "inject-webhook",
        *INJECT_FLAGS,
        "--listen",
        "127.0.0.1:0",
        "--tls-cert-file",
        str(tmp_path / "tls.crt"),
        "--tls-key-file",
        str(tmp_path / "tls.key"),
    )
    assert result.returncode == 1
    assert "do not match" in one_error_line(result)


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (("--redis-url", REDIS, "--self-signed"), {}, "--sidecar-image"),
        (INJECT_FLAGS, {"BUDGETWARDEN_INJECT_SIDECAR_CPU_REQUEST": "lots"}, "--sidecar-cpu-request"),
        (INJECT_FLAGS, {"BUDGETWARDEN_INJECT_CERT_RELOAD_SECONDS": "soon"}, "BUDGETWARDEN_INJECT_CERT_RELOAD_SECONDS"),
        (INJECT_FLAGS, {"BUDGETWARDEN_INJECT_SIDECAR_ENV": "not json"}, "JSON object"),
        ((*INJECT_FLAGS, "--sidecar-env", "POD_NAME=x"), {}, "set by the injector"),
        ((*INJECT_FLAGS, "--sidecar-memory-limit", "32Mi"), {}, "below the request"),
        ((*INJECT_FLAGS, "--sidecar-health-port", "50151"), {}, "must differ"),
        ((*INJECT_FLAGS, "--listen", "nowhere"), {}, "host:port"),
        (("--print-ca-bundle",), {}, "--self-signed-dir"),
    ],
)
def test_cli_bad_settings_are_one_line(args: tuple[str, ...], env: dict[str, str], says: str) -> None:
    result = cli("inject-webhook", *args, env=env)
    assert result.returncode == 2
    assert says in one_error_line(result)


def test_cli_prints_a_stable_ca_bundle(tmp_path: Path) -> None:
    first = cli("inject-webhook", "--self-signed", "--self-signed-dir", str(tmp_path / "ca"), "--print-ca-bundle")
    assert first.returncode == 0, first.stderr
    again = cli(
        "inject-webhook",
        "--print-ca-bundle",
        env={
            "BUDGETWARDEN_INJECT_SELF_SIGNED": "true",
            "BUDGETWARDEN_INJECT_SELF_SIGNED_DIR": str(tmp_path / "ca"),
        },
    )
    assert again.returncode == 0, again.stderr
    assert first.stdout == again.stdout
    pem = base64.b64decode(first.stdout.strip())
    assert pem == (tmp_path / "ca" / "ca.crt").read_bytes()
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o077 == 0, "the CA key is private"


def test_cli_serves_from_environment_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    environ = {key: value for key, value in os.environ.items() if not key.startswith("BUDGETWARDEN_")}
    environ.update(
        {
            "BUDGETWARDEN_INJECT_SIDECAR_IMAGE": IMAGE,
            "BUDGETWARDEN_INJECT_REDIS_URL_SECRET": "redis-credentials",
            "BUDGETWARDEN_INJECT_LEGACY_SIDECAR": "false",
            "BUDGETWARDEN_INJECT_SKIP_NAMESPACES": "kube-system",
            "BUDGETWARDEN_INJECT_SHUTDOWN_DELAY_SECONDS": "0",
            "BUDGETWARDEN_INJECT_TENANT_SOURCE": "annotation",
            "BUDGETWARDEN_INJECT_SIDECAR_ENV": json.dumps({"OTEL_SERVICE_NAME": "agent-budget"}),
            "POD_NAMESPACE": "platform",
        }
    )
    ca_dir = tmp_path / "ca"
    proc = subprocess.Popen(
        [
            *(
                sys.executable,
                "-m",
                "budgetwarden",
                "inject-webhook",
                "--self-signed",
                "--self-signed-dir",
                str(ca_dir),
            ),
            *("--listen", f"127.0.0.1:{port}", "--service-name", "bw-injector"),
        ],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        client: Client | None = None
        while client is None:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the webhook did not come up"
            try:
                candidate = Client(port, (ca_dir / "ca.crt").read_bytes(), "bw-injector.platform.svc")
                if candidate.request("GET", "/readyz")[0] == 200:
                    client = candidate
            except OSError:
                time.sleep(0.05)
        pod = deployment_pod()
        result = patched(pod, admit(client, review(pod)))
        validate_pod(result)
        env = env_of(sidecar_of(result))
        assert sidecar_of(result)["image"] == IMAGE
        assert env["BUDGETWARDEN_REDIS_URL"] == {"secretKeyRef": {"name": "redis-credentials", "key": "redis-url"}}
        assert env["OTEL_SERVICE_NAME"] == "agent-budget"
        # POD_NAMESPACE named the webhook's own namespace.
        assert "never injected" in admit(client, review(deployment_pod(namespace="platform")))["status"]["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    logs = [json.loads(line) for line in stderr.splitlines()]
    assert any(entry["message"].startswith("injector serving") and entry.get("ca_bundle") for entry in logs)
    assert any(entry.get("result") == "injected" and entry.get("uid") for entry in logs)
    assert logs[-1]["message"] == "injector stopped"


def test_server_stops_cleanly_while_a_client_holds_a_connection() -> None:
    server = start_server(replace(BASE, self_signed=True))
    certs = server.certificates
    assert isinstance(certs, inject.SelfSignedCertificate)
    client = Client(server.port, certs.ca_cert_pem)
    idle = client.connect()
    idle.request("GET", "/healthz")
    assert idle.getresponse().read() == b"ok\n"
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 5})
    stopper.start()
    stopper.join(60)
    assert not stopper.is_alive()
    idle.close()
    with pytest.raises(ConnectionRefusedError):
        client.request("GET", "/healthz")


# --------------------------------------------------------------------------------------------------------------------
# The injected container really runs.


def test_the_injected_container_starts_a_sidecar_whose_health_port_answers(redis_url: str, tmp_path: Path) -> None:
    """Run the injected container's command, args and env (downward-API values filled in as the kubelet would, the
    policy ConfigMap as a file) and probe it the way the kubelet does: grpc.health.v1 on the health port."""
    budget_port, health_port = free_port(), free_port()
    server = start_server(
        replace(BASE, self_signed=True, redis_url=redis_url, sidecar_port=budget_port, sidecar_health_port=health_port)
    )
    certs = server.certificates
    assert isinstance(certs, inject.SelfSignedCertificate)
    try:
        pod = deployment_pod({"budgetwarden.io/inject": "true", "budgetwarden.io/tenant": "acme"})
        result = patched(pod, admit(Client(server.port, certs.ca_cert_pem), review(pod)))
    finally:
        server.stop()
    sidecar = sidecar_of(result)
    policy = tmp_path / "policy.yaml"
    policy.write_text((Path(inject.__file__).parents[1] / "domain" / "default_policy.yaml").read_text())
    args = [str(policy) if arg == "/etc/budgetwarden/policy/policy.yaml" else arg for arg in sidecar["args"]]
    downward = {"metadata.name": "research-agent-7d9f8c6b5d-x2x9q", "metadata.namespace": "agents"}
    downward |= {"metadata.uid": "9f0e6a3c-1b2d-4e5f-8a9b-0c1d2e3f4a5b", "spec.nodeName": "node-1"}
    environ = {key: value for key, value in os.environ.items() if not key.startswith("BUDGETWARDEN_")}
    for entry in sidecar["env"]:
        ref = entry.get("valueFrom", {}).get("fieldRef")
        environ[entry["name"]] = downward[ref["fieldPath"]] if ref else entry["value"]
    environ["BUDGETWARDEN_CHECK_DEADLINE_MS"] = "30000"  # a busy machine may miss 250 ms: no fail-mode answer here
    assert sidecar["command"] == ["budgetwarden"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "budgetwarden", *args],
        env=environ,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        probe_port = sidecar["startupProbe"]["grpc"]["port"]
        assert probe_port == health_port
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(f"127.0.0.1:{probe_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "the sidecar never became ready"
                try:
                    answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                except grpc.RpcError:
                    time.sleep(0.1)
                    continue
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    break
        # The app container's BUDGETWARDEN_ADDR reaches the budget API.
        addr = env_of(result["spec"]["containers"][0])["BUDGETWARDEN_ADDR"]
        assert addr == f"127.0.0.1:{budget_port}"
        with BudgetClient(addr, timeout=10) as client:
            answer = client.check(tenant_id="acme", task_id="t-1", step_id="s-1", estimated_input_tokens=100)
            assert (answer.decision, answer.from_fail_mode, answer.granted_tokens) == (pb.DECISION_ALLOW, False, 100)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
