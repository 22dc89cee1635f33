"""The injector started as its Deployment runs it: a real ``budgetwarden inject-webhook`` process with the manifests'
own arguments and environment (per overlay) injects the example agent pod; the patched pod validates and lines up with
the rest (policy ConfigMap, Redis, NetworkPolicy, tenant)."""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime as dt
import http.client
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from support import free_port
from support_k8s import (
    INJECTOR,
    INSTALLS,
    READY_TIMEOUT,
    SIDECAR_LABEL,
    FakeApiServer,
    Resource,
    check_command_line,
    comment_text,
    documents,
    env_names,
    find,
    flag_values,
    injector_container,
    namespace_labels,
    pods,
    rendered,
    restricted_problems,
    selects,
    service_url_target,
    validate,
)

# --- the injector, run with the manifests' arguments ------------------------------------------------------------------


def issue_like_cert_manager(certificate: Resource, directory: Path) -> bytes:
    """What cert-manager's selfSigned issuer writes for ``certificate``: tls.crt (its own CA) and tls.key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    spec = certificate["spec"]
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec["commonName"])])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in spec["dnsNames"]]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tls.crt").write_bytes(cert_pem)
    (directory / "tls.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / "ca.crt").write_bytes(cert_pem)
    return cert_pem


@dataclass
class Injected:
    resources: list[Resource]  # the rendered kustomization
    pod: Resource  # the example agent pod after the returned patch
    sidecar: dict[str, Any]
    review: dict[str, Any]  # the AdmissionReview answer


def run_documented(command: str, cwd: Path) -> str:
    words = shlex.split(command)
    assert words[0] == "budgetwarden"
    environ = {key: value for key, value in os.environ.items() if not key.startswith("BUDGETWARDEN_")}
    result = subprocess.run(
        [sys.executable, "-m", "budgetwarden", *words[1:]],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def self_signed_setup(resources: list[Resource], mounts: Path, work: Path) -> bytes:
    """The self-signed overlay's documented steps: make the CA, put it where the Secret is mounted (the injector then
    writes the caBundle itself: see ``injector``)."""
    docs = comment_text("overlays/self-signed/kustomization.yaml")
    step1 = re.search(r"^\s*(budgetwarden inject-webhook [^\n]*--print-ca-bundle)$", docs, re.MULTILINE)
    assert step1 is not None
    bundle = run_documented(step1.group(1), work)
    step2 = re.search(r"create secret generic (\S+) \\\s*\n\s*(--from-file=\S+) (--from-file=\S+)", docs)
    assert step2 is not None
    files = dict(arg.removeprefix("--from-file=").split("=", 1) for arg in step2.groups()[1:])
    container = injector_container(resources)
    (ca_dir,) = flag_values(container["args"], "--self-signed-dir")
    pod = find(resources, "Deployment", INJECTOR)["spec"]["template"]["spec"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == ca_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == step2.group(1)
    secret_dir = mounts / ca_dir.lstrip("/")
    secret_dir.mkdir(parents=True)
    for key, source in files.items():
        shutil.copy(work / source, secret_dir / key)
    return base64.b64decode(bundle)


def api_objects(kustomization: str) -> list[Resource]:
    """What the cluster holds when the injector starts: the example namespace's objects (the policy ConfigMap; the
    documented Redis Secret for the overlays that read it), and the webhook configuration of the install."""
    objects = [r for r in rendered("examples/agent") if r["kind"] == "ConfigMap"]
    if kustomization in ("overlays/external-redis", "overlays/redis-cluster"):
        (secret,) = documents("overlays/external-redis/redis-secret.example.yaml")
        data = {key: base64.b64encode(value.encode()).decode() for key, value in secret.pop("stringData").items()}
        objects.append({**secret, "data": data})
    objects.append(find(rendered(kustomization), "MutatingWebhookConfiguration", INJECTOR))
    return objects


class Client:
    """HTTPS to 127.0.0.1:port as the API server calls the Service: the Service's DNS name, the caBundle as trust."""

    def __init__(self, port: int, ca_pem: bytes, server_name: str) -> None:
        self.port, self.server_name = port, server_name
        self.context = ssl.create_default_context(cadata=ca_pem.decode())

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        connection = http.client.HTTPSConnection(self.server_name, self.port, timeout=10, context=self.context)
        connection.sock = self.context.wrap_socket(raw, server_hostname=self.server_name)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


@contextlib.contextmanager
def injector(resources: list[Resource], tmp: Path, api: FakeApiServer) -> Iterator[Client]:
    """The injector as its Deployment runs it (args, env), its file paths under ``tmp``, on a free loopback port, with
    ``api`` as its Kubernetes API (in a cluster: the in-cluster address and the mounted ServiceAccount token)."""
    deployment = find(resources, "Deployment", INJECTOR)
    container = injector_container(resources)
    mounts = tmp / "mounts"
    args = [arg for arg in container["args"] if not arg.startswith("--listen")] + api.flags()
    # Paths in the container map to the same paths under tmp/mounts.
    args = [re.sub(r"=(/etc/\S+)", lambda m: "=" + str(mounts / m.group(1).lstrip("/")), arg) for arg in args]
    webhook = find(resources, "MutatingWebhookConfiguration", INJECTOR)
    ref = webhook["webhooks"][0]["clientConfig"]["service"]
    server_name = f"{ref['name']}.{ref['namespace']}.svc"
    if "--self-signed" in container["args"]:
        ca_pem = self_signed_setup(resources, mounts, tmp)
    else:
        certificate = find(resources, "Certificate", "budgetwarden-webhook")
        (cert_file,) = flag_values(args, "--tls-cert-file")
        ca_pem = issue_like_cert_manager(certificate, Path(cert_file).parent)
    environ = {key: value for key, value in os.environ.items() if not key.startswith("BUDGETWARDEN_")}
    for entry in container.get("env", []):
        if "value" in entry:
            environ[entry["name"]] = entry["value"]
        elif entry["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            environ[entry["name"]] = deployment["metadata"]["namespace"]
    port = free_port()
    process = subprocess.Popen(
        # No drain delay on SIGTERM here (it lets endpoints catch up in a cluster; a test only waits for it).
        [sys.executable, "-m", "budgetwarden", *args, f"--listen=127.0.0.1:{port}", "--shutdown-delay-seconds=0"],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = Client(port, ca_pem, server_name)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            assert process.poll() is None, f"the injector exited: {process.stdout.read() if process.stdout else ''}"
            with contextlib.suppress(OSError):
                if client.request("GET", "/readyz")[0] == 200:
                    break
            assert time.monotonic() < deadline, "the injector never became ready"
            time.sleep(0.1)
        assert client.request("GET", "/healthz")[0] == 200
        if "--self-signed" in container["args"]:
            # The injector writes its CA into every entry of the webhook configuration (--patch-webhook-ca).
            (name,) = flag_values(container["args"], "--patch-webhook-ca")
            assert name == webhook["metadata"]["name"]
            bundle = base64.b64encode(ca_pem).decode()
            while {e["clientConfig"].get("caBundle") for e in api.get(webhook)["webhooks"]} != {bundle}:
                assert time.monotonic() < deadline + READY_TIMEOUT, "the injector never wrote the caBundle"
                time.sleep(0.1)
            validate(api.get(webhook))
        yield client
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def example_pod() -> Resource:
    """The example agent's pod as the ReplicaSet controller creates it."""
    (agent,) = pods(rendered("examples/agent"))
    template = copy.deepcopy(agent.owner["spec"]["template"])
    metadata = {
        "generateName": f"{agent.owner['metadata']['name']}-5d9c7b6f8d-",
        "namespace": agent.namespace,
        "labels": {**template["metadata"]["labels"], "pod-template-hash": "5d9c7b6f8d"},
        "annotations": template["metadata"]["annotations"],
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def admission_review(pod: Resource) -> dict[str, Any]:
    kind = {"group": "", "version": "v1", "kind": "Pod"}
    resource = {"group": "", "version": "v1", "resource": "pods"}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": kind,
            "resource": resource,
            "requestKind": kind,
            "requestResource": resource,
            "namespace": pod["metadata"]["namespace"],
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"],
            },
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def inject_example(kustomization: str, tmp: Path) -> Injected:
    resources = rendered(kustomization)
    pod = example_pod()
    webhook = find(resources, "MutatingWebhookConfiguration", INJECTOR)
    agents = find(rendered("examples/agent"), "Namespace", "acme")
    (path,) = [
        entry["clientConfig"]["service"]["path"]
        for entry in webhook["webhooks"]
        if selects(entry["namespaceSelector"], namespace_labels(agents))
        and selects(entry["objectSelector"], pod["metadata"]["labels"])
    ]
    review = admission_review(pod)
    with FakeApiServer(tmp / "api") as api:
        for resource in api_objects(kustomization):
            api.put(resource)
        with injector(resources, tmp, api) as client:
            status, body = client.request("POST", f"{path}?timeout=5s", json.dumps(review).encode())
        # It checked the namespace for what the sidecar mounts before injecting.
        assert ("GET", "/api/v1/namespaces/acme/configmaps/budgetwarden-policy") in api.requests
    assert status == 200, body
    answer = json.loads(body)
    response = answer["response"]
    assert response["uid"] == review["request"]["uid"]
    assert response["allowed"] is True, response
    assert response["patchType"] == "JSONPatch"
    patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
    everything = patched["spec"].get("initContainers", []) + patched["spec"]["containers"]
    (sidecar,) = [c for c in everything if c["name"] == "budgetwarden"]
    return Injected(resources, patched, sidecar, answer)


@pytest.fixture(scope="module")
def injected(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The example agent injected by the injector of a kustomization (each run once per module)."""
    done: dict[str, Injected] = {}

    def get(kustomization: str) -> Injected:
        if kustomization not in done:
            done[kustomization] = inject_example(kustomization, tmp_path_factory.mktemp("injector"))
        return done[kustomization]

    return get


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.slow
@pytest.mark.parametrize("kustomization", INSTALLS)
def test_injector_with_the_manifests_args_injects_the_example_agent(injected: Any, kustomization: str) -> None:
    result: Injected = injected(kustomization)
    pod, sidecar = result.pod, result.sidecar
    validate(pod)  # a Pod the API server accepts
    assert restricted_problems(pod["spec"], "agent") == []  # and the agents namespace's Pod Security admits
    legacy = kustomization == "overlays/legacy-sidecar"
    if legacy:
        assert sidecar in pod["spec"]["containers"]
        assert "restartPolicy" not in sidecar
    else:  # a native sidecar: an init container that keeps running, started (probed) before the agent
        assert sidecar in pod["spec"]["initContainers"]
        assert sidecar["restartPolicy"] == "Always"
        assert "startupProbe" in sidecar
    container = injector_container(result.resources)
    (image,) = [e["value"] for e in container["env"] if e["name"] == "BUDGETWARDEN_INJECT_SIDECAR_IMAGE"]
    assert sidecar["image"] == image == container["image"]
    # The sidecar's command line is a real `budgetwarden serve`, its health on the pod IP where the probes look.
    words = [*sidecar.get("command", ["budgetwarden"])[1:], *sidecar["args"]]
    check_command_line(words, f"{kustomization}: the injected sidecar")
    assert words[0] == "serve"
    (health,) = flag_values(words, "--health-listen")
    host, port = health.rsplit(":", 1)
    assert host == "0.0.0.0"
    assert sidecar["readinessProbe"]["grpc"]["port"] == int(port) == 50160
    (listen,) = flag_values(words, "--listen")
    assert listen.startswith("127.0.0.1:")  # the budget API stays on loopback
    (agent,) = [c for c in pod["spec"]["containers"] if c["name"] == "agent"]
    assert env_of(agent)["BUDGETWARDEN_ADDR"] == listen
    sidecar_env = env_of(sidecar)
    # The tenant and task type of the annotations.
    assert sidecar_env["BUDGETWARDEN_TENANT"] == "acme"
    assert sidecar_env["BUDGETWARDEN_DEFAULT_TASK_TYPE"] == "research"
    # The policy: the ConfigMap of the agents namespace, mounted where --policy-file looks.
    (policy_file,) = flag_values(words, "--policy-file")
    (mount,) = [m for m in sidecar["volumeMounts"] if policy_file.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    config_map = find(rendered("examples/agent"), "ConfigMap", volume["configMap"]["name"], "acme")
    assert policy_file.removeprefix(mount["mountPath"] + "/") in config_map["data"]
    # Redis: the base's Service, or the documented Secret in the pod's namespace.
    redis = sidecar_env["BUDGETWARDEN_REDIS_URL"]
    if kustomization in ("overlays/external-redis", "overlays/redis-cluster"):
        (example,) = documents("overlays/external-redis/redis-secret.example.yaml")
        assert redis == {
            "secretKeyRef": {"name": example["metadata"]["name"], "key": next(iter(example["stringData"]))}
        }
        assert example["metadata"]["namespace"] == pod["metadata"]["namespace"]
    else:
        service, _ = service_url_target(result.resources, redis)
        assert service["metadata"]["name"] == "budgetwarden-redis"
    assert (sidecar_env.get("BUDGETWARDEN_REDIS_CLUSTER") == "true") == (kustomization == "overlays/redis-cluster")
    # The metrics go to the collector.
    assert sidecar_env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://budgetwarden-otel-collector.budgetwarden.svc:")


@pytest.mark.slow
def test_every_budgetwarden_variable_of_the_injected_sidecar_is_a_serve_setting(injected: Any) -> None:
    sidecar_env = env_of(injected("base").sidecar)
    names = {name for name in sidecar_env if name.startswith("BUDGETWARDEN_")}
    assert {"BUDGETWARDEN_TENANT", "BUDGETWARDEN_REDIS_URL"} <= names
    unknown = names - env_names("serve")
    assert not unknown, f"`budgetwarden serve` reads no {sorted(unknown)}: the setting would be ignored"


@pytest.mark.slow
def test_injected_example_pod_is_let_through_the_redis_network_policy(injected: Any) -> None:
    result: Injected = injected("base")
    policy = find(result.resources, "NetworkPolicy", "budgetwarden-redis")
    labels = result.pod["metadata"].get("labels", {})
    (rule,) = policy["spec"]["ingress"]
    assert any(
        selects(peer["podSelector"], labels) and selects(peer.get("namespaceSelector", {}), namespace_labels("acme"))
        for peer in rule["from"]
        if "namespaceSelector" in peer
    ), f"the injector labels the pod {labels}: the NetworkPolicy wants {SIDECAR_LABEL}"


@pytest.mark.slow
def test_reinjecting_the_injected_example_pod_changes_nothing(injected: Any, tmp_path: Path) -> None:
    result: Injected = injected("base")
    review = admission_review(result.pod)
    with FakeApiServer(tmp_path / "api") as api:
        for resource in api_objects("base"):
            api.put(resource)
        with injector(result.resources, tmp_path, api) as client:
            status, body = client.request("POST", "/mutate-all", json.dumps(review).encode())
    assert status == 200
    response = json.loads(body)["response"]
    assert response["allowed"] is True
    patch = json.loads(base64.b64decode(response["patch"])) if "patch" in response else []
    assert patch == []
