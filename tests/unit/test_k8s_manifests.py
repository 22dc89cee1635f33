"""The Kubernetes manifests under k8s/: schemas, the rendered kustomizations, and every cross-reference between them.

- Every manifest file and every kustomization's rendered output (``support_kustomize``, a renderer for exactly the
  kustomize features used) validates strictly against the Kubernetes JSON schemas of the newest release that
  ``kubernetes-validate`` ships; cert-manager's Issuer and Certificate, which are CRDs, against small hand-written
  schemas of the fields used (and nothing else may lack a schema).
- What a schema cannot see: Services select pods and ports that exist, the webhook reaches the injector, the
  certificate is the Secret mounted, the NetworkPolicy selects what it means to, every pod meets Pod Security
  "restricted", every ``budgetwarden`` command line uses real subcommands and flags.
- The injector itself, started with the manifests' own arguments (per overlay), injects the example agent pod; the
  patched pod validates and lines up with the rest (policy ConfigMap, Redis, NetworkPolicy, tenant).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime as dt
import functools
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
from urllib.parse import urlsplit

import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import yaml
from support_kustomize import RenderError, UnsupportedError, render, resource_id

from budgetwarden.store._embedded import free_port

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
K8S_VERSION = kubernetes_validate.latest_version()
IMAGE = "ghcr.io/budgetwarden/budgetwarden:0.1.0"
# YAML under k8s/ that is configuration read by a program, not a Kubernetes object.
CONFIG_FILES = {"otel-collector-config.yaml", "policy/policy.yaml"}
KUSTOMIZATIONS = {
    "",
    "policy",
    "examples/agent",
    "overlays/external-redis",
    "overlays/redis-cluster",
    "overlays/legacy-sidecar",
    "overlays/self-signed",
}
# What installs budgetwarden (the base and its overlays), as opposed to the parts they are built from.
INSTALLS = ["", "overlays/external-redis", "overlays/redis-cluster", "overlays/legacy-sidecar", "overlays/self-signed"]
SIDECAR_LABEL = {"budgetwarden.io/sidecar": "injected"}
INJECTOR = "budgetwarden-injector"
READY_TIMEOUT = 30.0

Resource = dict[str, Any]

# --- schemas ---------------------------------------------------------------------------------------------------------

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "additionalProperties": False,
    "properties": {"name": _NAME, "namespace": _NAME, "labels": _STRINGS, "annotations": _STRINGS},
}
_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}
# cert-manager.io/v1 KeyUsage
_USAGES = [
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
]
# The fields of cert-manager's v1 CRDs that these manifests use (typed as in the CRDs); anything else is refused.
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("cert-manager.io/v1", "Issuer"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"},
            "kind": {"const": "Issuer"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "minProperties": 1,
                "maxProperties": 1,  # exactly one kind of issuer
                "additionalProperties": False,
                "properties": {
                    "selfSigned": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"crlDistributionPoints": {"type": "array", "items": {"type": "string"}}},
                    },
                    "ca": {
                        "type": "object",
                        "required": ["secretName"],
                        "additionalProperties": False,
                        "properties": {"secretName": _NAME},
                    },
                },
            },
        },
    },
    ("cert-manager.io/v1", "Certificate"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"},
            "kind": {"const": "Certificate"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["secretName", "issuerRef"],
                "additionalProperties": False,
                "properties": {
                    "secretName": _NAME,
                    "commonName": {"type": "string", "maxLength": 64},
                    "dnsNames": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                    "duration": _DURATION,
                    "renewBefore": _DURATION,
                    "isCA": {"type": "boolean"},
                    "usages": {"type": "array", "items": {"enum": _USAGES}, "uniqueItems": True},
                    "privateKey": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                            "size": {"type": "integer"},
                            "encoding": {"enum": ["PKCS1", "PKCS8"]},
                            "rotationPolicy": {"enum": ["Never", "Always"]},
                        },
                    },
                    "issuerRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {"name": _NAME, "kind": {"type": "string"}, "group": {"type": "string"}},
                    },
                },
            },
        },
    },
}


def validate(resource: Resource) -> None:
    """Strict validation: the core schemas of K8S_VERSION, or the CRD schema above. Raises on any problem."""
    schema = CRD_SCHEMAS.get((resource.get("apiVersion", ""), resource.get("kind", "")))
    if schema is not None:
        jsonschema.Draft202012Validator(schema).validate(resource)
    else:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


# --- reading the manifests -------------------------------------------------------------------------------------------


def yaml_files() -> list[str]:
    return sorted(path.relative_to(K8S).as_posix() for path in K8S.rglob("*.yaml"))


def manifest_files() -> list[str]:
    return [name for name in yaml_files() if Path(name).name != "kustomization.yaml" and name not in CONFIG_FILES]


def documents(name: str) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc is not None]


@functools.cache
def _rendered(name: str) -> tuple[Resource, ...]:
    return tuple(render(K8S / name))


def rendered(name: str) -> list[Resource]:
    """A fresh copy of a kustomization's output (rendered once)."""
    return copy.deepcopy(list(_rendered(name)))


def find(resources: list[Resource], kind: str, name: str, namespace: str | None = None) -> Resource:
    found = [
        r
        for r in resources
        if r["kind"] == kind
        and r["metadata"]["name"] == name
        and (namespace is None or r["metadata"].get("namespace") == namespace)
    ]
    assert len(found) == 1, f"{kind} {namespace}/{name}: {len(found)} found"
    return found[0]


@dataclass
class Pod:
    owner: Resource
    namespace: str
    labels: dict[str, str]
    annotations: dict[str, str]
    spec: dict[str, Any]

    def containers(self) -> list[dict[str, Any]]:
        return list(self.spec.get("initContainers", [])) + list(self.spec["containers"])


def pods(resources: list[Resource]) -> list[Pod]:
    """The pod templates of the workloads."""
    found = []
    for r in resources:
        if r["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            template = r["spec"]["template"]
            metadata = template.get("metadata", {})
            found.append(
                Pod(
                    r,
                    r["metadata"]["namespace"],
                    metadata.get("labels", {}),
                    metadata.get("annotations", {}),
                    template["spec"],
                )
            )
    return found


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions); {} selects everything."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def namespace_labels(namespace: Resource | str) -> dict[str, str]:
    """A namespace's labels as the API server keeps them (it adds kubernetes.io/metadata.name)."""
    if isinstance(namespace, str):
        return {"kubernetes.io/metadata.name": namespace}
    name = namespace["metadata"]["name"]
    return {**namespace["metadata"].get("labels", {}), "kubernetes.io/metadata.name": name}


def flag_values(args: list[str], flag: str) -> list[str]:
    """Values of ``--flag=value`` and ``--flag value`` in an argument list."""
    values = []
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
        elif arg == flag and i + 1 < len(args):
            values.append(args[i + 1])
    return values


def injector_container(resources: list[Resource]) -> dict[str, Any]:
    deployment = find(resources, "Deployment", INJECTOR)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def comment_text(name: str) -> str:
    """The comment lines of a file, without their leading '#'."""
    lines = (K8S / name).read_text().splitlines()
    return "\n".join(line.strip()[1:] for line in lines if line.strip().startswith("#"))


# --- the CLI's real subcommands and flags ----------------------------------------------------------------------------


@functools.cache
def help_text(*command: str) -> str:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("BUDGETWARDEN_")}
    result = subprocess.run(
        [sys.executable, "-m", "budgetwarden", *command, "--help"],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"budgetwarden {' '.join(command)} --help: {result.stderr}"
    return result.stdout


def subcommands() -> set[str]:
    found = re.search(r"\{([a-z,-]+)\}", help_text())
    assert found is not None
    return set(found.group(1).split(","))


def flags(*command: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text(*command)))


def env_names(*command: str) -> set[str]:
    return set(re.findall(r"env\s+(BUDGETWARDEN_[A-Z0-9_]+)", help_text(*command)))


def check_command_line(words: list[str], where: str) -> None:
    """``words`` (after ``budgetwarden``) name a real subcommand, and every --flag is one of its flags."""
    assert words, where
    command = words[:1]
    if words[0] == "policy":  # the one nested command
        command = words[:2]
    assert command[0] in subcommands(), f"{where}: no subcommand {command[0]!r}"
    known = flags(*command)
    for word in words[len(command) :]:
        if word.startswith("--"):
            assert word.split("=", 1)[0] in known, f"{where}: `budgetwarden {' '.join(command)}` has no {word}"


# --- schemas: every file, every rendered kustomization -------------------------------------------------------------


def test_every_yaml_file_is_a_kustomization_a_manifest_or_a_known_config_file() -> None:
    names = yaml_files()
    assert set(names) >= CONFIG_FILES
    assert {str(Path(k) / "kustomization.yaml") if k else "kustomization.yaml" for k in KUSTOMIZATIONS} == {
        name for name in names if Path(name).name == "kustomization.yaml"
    }
    for name in manifest_files():
        docs = documents(name)
        assert docs, name
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{name}: not a Kubernetes object"


@pytest.mark.parametrize("name", manifest_files())
def test_manifest_file_validates(name: str) -> None:
    for doc in documents(name):
        validate(doc)


@pytest.mark.parametrize("kustomization", sorted(KUSTOMIZATIONS))
def test_rendered_kustomization_validates(kustomization: str) -> None:
    resources = rendered(kustomization)
    assert resources
    for resource in resources:
        validate(resource)
        # Everything has its namespace, except the policy part (no namespace on purpose: it is reused per namespace).
        if resource["kind"] not in ("Namespace", "MutatingWebhookConfiguration") and kustomization != "policy":
            assert resource["metadata"].get("namespace"), resource_id(resource)


def test_validation_rejects_what_the_api_server_would() -> None:
    base = rendered("")
    broken: list[Resource] = []
    deployment = copy.deepcopy(find(base, "Deployment", INJECTOR))
    deployment["spec"]["replica"] = 2  # a typo
    broken.append(deployment)
    service = copy.deepcopy(find(base, "Service", INJECTOR))
    service["spec"]["ports"][0]["port"] = "443"  # a string
    broken.append(service)
    webhook = copy.deepcopy(find(base, "MutatingWebhookConfiguration", INJECTOR))
    del webhook["webhooks"][0]["admissionReviewVersions"]  # required
    broken.append(webhook)
    certificate = copy.deepcopy(find(base, "Certificate", "budgetwarden-webhook"))
    del certificate["spec"]["secretName"]
    broken.append(certificate)
    certificate = copy.deepcopy(find(base, "Certificate", "budgetwarden-webhook"))
    certificate["spec"]["dnsName"] = ["x"]  # a typo
    broken.append(certificate)
    issuer = copy.deepcopy(find(base, "Issuer", "budgetwarden-selfsigned"))
    issuer["spec"]["ca"] = {"secretName": "x"}  # two kinds of issuer
    broken.append(issuer)
    for resource in broken:
        with pytest.raises(jsonschema.ValidationError):
            validate(resource)
    # A kind with no schema (core or hand-written) is an error, not a pass.
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate({"apiVersion": "cert-manager.io/v1", "kind": "ClusterIssuer", "metadata": {"name": "x"}})


# --- the renderer and the overlays ---------------------------------------------------------------------------------


def ids(resources: list[Resource]) -> set[tuple[str, str, str, str]]:
    return {resource_id(r) for r in resources}


def by_id(resources: list[Resource]) -> dict[tuple[str, str, str, str], Resource]:
    return {resource_id(r): r for r in resources}


def changed(base: list[Resource], overlay: list[Resource]) -> set[tuple[str, str, str, str]]:
    """Ids present in both whose content differs."""
    before, after = by_id(base), by_id(overlay)
    return {key for key in before.keys() & after.keys() if before[key] != after[key]}


REDIS_IDS = {
    ("apps", "StatefulSet", "budgetwarden", "budgetwarden-redis"),
    ("", "Service", "budgetwarden", "budgetwarden-redis"),
    ("networking.k8s.io", "NetworkPolicy", "budgetwarden", "budgetwarden-redis"),
}
INJECTOR_ID = ("apps", "Deployment", "budgetwarden", INJECTOR)


def test_base_renders_everything_in_the_budgetwarden_namespace() -> None:
    base = rendered("")
    kinds = {(r["kind"], r["metadata"]["name"]) for r in base}
    assert kinds == {
        ("Namespace", "budgetwarden"),
        ("Service", "budgetwarden-redis"),
        ("StatefulSet", "budgetwarden-redis"),
        ("NetworkPolicy", "budgetwarden-redis"),
        ("ConfigMap", "budgetwarden-policy"),
        ("ServiceAccount", INJECTOR),
        ("Deployment", INJECTOR),
        ("Service", INJECTOR),
        ("PodDisruptionBudget", INJECTOR),
        ("MutatingWebhookConfiguration", INJECTOR),
        ("Issuer", "budgetwarden-selfsigned"),
        ("Certificate", "budgetwarden-webhook"),
        ("Deployment", "budgetwarden-otel-collector"),
        ("Service", "budgetwarden-otel-collector"),
        ("ConfigMap", "budgetwarden-otel-collector-config"),
    }
    assert {r["metadata"].get("namespace") for r in base if r["kind"] not in ("Namespace",)} - {None} == {
        "budgetwarden"
    }
    collector_config = find(base, "ConfigMap", "budgetwarden-otel-collector-config")
    assert collector_config["data"] == {"otel-collector-config.yaml": (K8S / "otel-collector-config.yaml").read_text()}


def test_external_redis_overlay_drops_redis_and_reads_the_url_from_a_secret() -> None:
    base, overlay = rendered(""), rendered("overlays/external-redis")
    assert ids(base) - ids(overlay) == REDIS_IDS
    assert ids(overlay) <= ids(base)
    assert changed(base, overlay) == {INJECTOR_ID}
    args = injector_container(overlay)["args"]
    assert not flag_values(args, "--redis-url")
    (secret_ref,) = flag_values(args, "--redis-url-secret")
    name, key = secret_ref.split(":")
    # The example Secret and the documented command create exactly that name and key.
    (example,) = documents("overlays/external-redis/redis-secret.example.yaml")
    assert (example["metadata"]["name"], list(example["stringData"])) == (name, [key])
    assert urlsplit(example["stringData"][key]).scheme == "rediss"
    created = re.search(
        r"create secret generic (\S+) \\\s*\n\s*--from-literal=([\w-]+)=",
        comment_text("overlays/external-redis/kustomization.yaml"),
    )
    assert created is not None
    assert created.groups() == (name, key)


def test_redis_cluster_overlay_is_external_redis_plus_the_cluster_flag() -> None:
    external, cluster = rendered("overlays/external-redis"), rendered("overlays/redis-cluster")
    assert ids(external) == ids(cluster)
    assert changed(external, cluster) == {INJECTOR_ID}
    assert injector_container(cluster)["args"] == [*injector_container(external)["args"], "--redis-cluster"]


def test_legacy_sidecar_overlay_only_adds_its_flag() -> None:
    base, legacy = rendered(""), rendered("overlays/legacy-sidecar")
    assert ids(base) == ids(legacy)
    assert changed(base, legacy) == {INJECTOR_ID}
    assert injector_container(legacy)["args"] == [*injector_container(base)["args"], "--legacy-sidecar"]


def test_self_signed_overlay_drops_cert_manager() -> None:
    base, overlay = rendered(""), rendered("overlays/self-signed")
    assert ids(base) - ids(overlay) == {
        ("cert-manager.io", "Issuer", "budgetwarden", "budgetwarden-selfsigned"),
        ("cert-manager.io", "Certificate", "budgetwarden", "budgetwarden-webhook"),
    }
    assert not any(r["apiVersion"].startswith("cert-manager.io/") for r in overlay)
    webhook = find(overlay, "MutatingWebhookConfiguration", INJECTOR)
    assert not any(key.startswith("cert-manager.io/") for key in webhook["metadata"].get("annotations", {}))
    container = injector_container(overlay)
    args = container["args"]
    assert "--self-signed" in args
    assert not flag_values(args, "--tls-cert-file")
    assert not flag_values(args, "--tls-key-file")
    (ca_dir,) = flag_values(args, "--self-signed-dir")
    pod = find(overlay, "Deployment", INJECTOR)["spec"]["template"]["spec"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == ca_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "budgetwarden-webhook-ca"
    assert "budgetwarden-webhook-tls" not in json.dumps(overlay)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


CONFIG_MAP = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  a: b\n"


def test_renderer_applies_what_it_supports(tmp_path: Path) -> None:
    write(tmp_path / "base" / "cm.yaml", CONFIG_MAP.format(name="one") + "---\n" + CONFIG_MAP.format(name="two"))
    write(tmp_path / "base" / "ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: space\n")
    write(tmp_path / "base" / "file.txt", "content\n")
    write(
        tmp_path / "base" / "kustomization.yaml",
        "namespace: space\nresources: [cm.yaml, ns.yaml]\ngeneratorOptions: {disableNameSuffixHash: true}\n"
        "configMapGenerator:\n- name: generated\n  files: [key=file.txt]\n",
    )
    write(
        tmp_path / "overlay" / "kustomization.yaml",
        "resources: [../base]\npatches:\n"
        "- patch: |-\n    $patch: delete\n    apiVersion: v1\n    kind: ConfigMap\n    metadata: {name: one}\n"
        "- target: {kind: ConfigMap, name: two}\n  patch: |-\n    - {op: test, path: /data/a, value: b}\n"
        "    - {op: replace, path: /data/a, value: c}\n",
    )
    out = render(tmp_path / "overlay")
    assert {(r["kind"], r["metadata"]["name"], r["metadata"].get("namespace")) for r in out} == {
        ("ConfigMap", "two", "space"),
        ("ConfigMap", "generated", "space"),
        ("Namespace", "space", None),
    }
    assert find(out, "ConfigMap", "two")["data"] == {"a": "c"}
    assert find(out, "ConfigMap", "generated")["data"] == {"key": "content\n"}


@pytest.mark.parametrize(
    ("kustomization", "error"),
    [
        ("resources: [cm.yaml]\nimages: [{name: x, newTag: y}]\n", UnsupportedError),
        ("configMapGenerator:\n- name: g\n  files: [cm.yaml]\n", UnsupportedError),  # hash suffix
        (
            "resources: [cm.yaml]\npatches:\n- patch: |-\n    apiVersion: v1\n    kind: ConfigMap\n"
            "    metadata: {name: one}\n    data: {a: z}\n",
            UnsupportedError,  # a strategic merge other than $patch: delete
        ),
        ("resources: [cm.yaml]\npatches:\n- target: {name: o.*}\n  patch: '[]'\n", UnsupportedError),
        ("resources: [../outside.yaml]\n", RenderError),  # kustomize's load restrictor
        ("resources: [missing.yaml]\n", RenderError),
        ("resources: [cm.yaml, cm.yaml]\n", RenderError),  # the same id twice
        ("resources: [cm.yaml]\npatches:\n- target: {name: nothing}\n  patch: '[]'\n", RenderError),
        (
            "resources: [cm.yaml]\npatches:\n- patch: |-\n    $patch: delete\n    apiVersion: v1\n"
            "    kind: ConfigMap\n    metadata: {name: other}\n",
            RenderError,
        ),
        ("namespace: other\nresources: [ns.yaml]\n", UnsupportedError),  # kustomize would rename the Namespace
        (
            "resources: [cm.yaml]\npatches:\n- target: {kind: ConfigMap}\n  patch: '[{op: test, path: /data/a, "
            "value: z}]'\n",
            jsonpatch.JsonPatchTestFailed,
        ),
    ],
)
def test_renderer_refuses_what_kustomize_would_or_what_it_lacks(
    tmp_path: Path, kustomization: str, error: type[Exception]
) -> None:
    write(tmp_path / "outside.yaml", CONFIG_MAP.format(name="outside"))
    write(tmp_path / "k" / "cm.yaml", CONFIG_MAP.format(name="one"))
    write(tmp_path / "k" / "ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: space\n")
    write(tmp_path / "k" / "kustomization.yaml", kustomization)
    with pytest.raises(error):
        render(tmp_path / "k")


# --- cross-references -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", [*INSTALLS, "examples/agent"])
def test_services_select_pods_and_ports_that_exist(kustomization: str) -> None:
    resources = rendered(kustomization)
    for service in (r for r in resources if r["kind"] == "Service"):
        namespace = service["metadata"]["namespace"]
        selected = [
            p
            for p in pods(resources)
            if p.namespace == namespace and selects({"matchLabels": service["spec"]["selector"]}, p.labels)
        ]
        assert selected, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for pod in selected:
                container_ports = [cp for c in pod.containers() for cp in c.get("ports", [])]
                if isinstance(target, str):
                    assert target in {cp.get("name") for cp in container_ports}, (service["metadata"]["name"], target)
                else:
                    assert target in {cp["containerPort"] for cp in container_ports}, (
                        service["metadata"]["name"],
                        target,
                    )
    for statefulset in (r for r in resources if r["kind"] == "StatefulSet"):
        governing = find(resources, "Service", statefulset["spec"]["serviceName"], statefulset["metadata"]["namespace"])
        assert governing["spec"]["clusterIP"] == "None"  # headless
    for workload in (r for r in resources if r["kind"] in ("Deployment", "StatefulSet")):
        assert selects(workload["spec"]["selector"], workload["spec"]["template"]["metadata"]["labels"])


def container_port(pod_spec: dict[str, Any], container: dict[str, Any], target: int | str) -> int:
    for port in container.get("ports", []):
        if target in (port.get("name"), port["containerPort"]):
            return int(port["containerPort"])
    raise AssertionError(f"no port {target} in {container['name']}")


@pytest.mark.parametrize("kustomization", INSTALLS)
def test_webhook_reaches_the_injector(kustomization: str) -> None:
    resources = rendered(kustomization)
    webhook = find(resources, "MutatingWebhookConfiguration", INJECTOR)
    deployment = find(resources, "Deployment", INJECTOR)
    container = injector_container(resources)
    (listen,) = flag_values(container["args"], "--listen")
    listen_port = int(listen.rsplit(":", 1)[1])
    assert [entry["clientConfig"]["service"]["path"] for entry in webhook["webhooks"]] == ["/mutate-all", "/mutate"]
    for entry in webhook["webhooks"]:
        ref = entry["clientConfig"]["service"]
        service = find(resources, "Service", ref["name"], ref["namespace"])
        assert service["metadata"]["namespace"] == deployment["metadata"]["namespace"]
        assert selects(
            {"matchLabels": service["spec"]["selector"]}, deployment["spec"]["template"]["metadata"]["labels"]
        )
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref.get("port", 443)]
        assert container_port(deployment["spec"]["template"]["spec"], container, port["targetPort"]) == listen_port
        assert entry["admissionReviewVersions"] == ["v1"]
        assert entry["sideEffects"] == "None"
        assert entry["timeoutSeconds"] == 5
        assert entry["failurePolicy"] == "Ignore"
        assert entry["reinvocationPolicy"] == "IfNeeded"
        assert entry["matchPolicy"] == "Equivalent"
        assert entry["rules"] == [
            {
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ]
        assert "caBundle" not in entry["clientConfig"]  # cert-manager injects it, or the self-signed steps patch it
    # The note on making it Fail sits with the setting.
    text = (K8S / "webhook.yaml").read_text()
    assert "failurePolicy: Fail" in text or "`failurePolicy: Fail`" in text


def test_webhook_selects_opted_in_namespaces_and_never_its_own_or_kube_system() -> None:
    webhook = find(rendered(""), "MutatingWebhookConfiguration", INJECTOR)
    agents = find(rendered("examples/agent"), "Namespace", "agents")
    budgetwarden = find(rendered(""), "Namespace", "budgetwarden")

    def paths(namespace: dict[str, str], pod_labels: dict[str, str]) -> list[str]:
        return [
            entry["clientConfig"]["service"]["path"]
            for entry in webhook["webhooks"]
            if selects(entry["namespaceSelector"], namespace) and selects(entry["objectSelector"], pod_labels)
        ]

    assert paths(namespace_labels(agents), {}) == ["/mutate-all"]  # opted in by label: every pod
    assert paths(namespace_labels("default"), {}) == ["/mutate"]  # elsewhere: pods opting in by annotation
    assert paths(namespace_labels(agents), {"budgetwarden.io/inject": "false"}) == []  # a pod opting out
    disabled = {**namespace_labels("other"), "budgetwarden.io/inject": "disabled"}
    assert paths(disabled, {}) == []
    for never in (budgetwarden, "kube-system", "kube-public", "kube-node-lease"):
        labels = namespace_labels(never)
        assert paths(labels, {}) == []
        assert paths({**labels, "budgetwarden.io/inject": "enabled"}, {}) == []  # even if labelled
    # And the injector does not inject its own namespace either (its default, from POD_NAMESPACE).
    container = injector_container(rendered(""))
    (pod_namespace,) = [e for e in container["env"] if e["name"] == "POD_NAMESPACE"]
    assert pod_namespace["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_certificate_is_the_secret_the_injector_mounts_and_the_ca_the_webhook_trusts() -> None:
    base = rendered("")
    certificate = find(base, "Certificate", "budgetwarden-webhook")
    spec = certificate["spec"]
    issuer = find(base, "Issuer", spec["issuerRef"]["name"], certificate["metadata"]["namespace"])
    assert spec["issuerRef"].get("kind", "Issuer") == issuer["kind"]
    assert "selfSigned" in issuer["spec"]
    webhook = find(base, "MutatingWebhookConfiguration", INJECTOR)
    assert webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        f"{certificate['metadata']['namespace']}/{certificate['metadata']['name']}"
    )
    # Valid for every name the API server may use for the Service.
    ref = webhook["webhooks"][0]["clientConfig"]["service"]
    service = f"{ref['name']}.{ref['namespace']}"
    assert {ref["name"], service, f"{service}.svc", f"{service}.svc.cluster.local"} <= set(spec["dnsNames"])
    assert spec["commonName"] in spec["dnsNames"]
    assert "server auth" in spec["usages"]
    assert spec["privateKey"]["algorithm"] != "ECDSA" or spec["privateKey"]["size"] in (256, 384, 521)
    # The injector mounts that Secret and reads cert-manager's tls.crt / tls.key from it.
    deployment = find(base, "Deployment", INJECTOR)
    pod = deployment["spec"]["template"]["spec"]
    container = injector_container(base)
    (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == spec["secretName"]]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    assert flag_values(container["args"], "--tls-cert-file") == [f"{mount['mountPath']}/tls.crt"]
    assert flag_values(container["args"], "--tls-key-file") == [f"{mount['mountPath']}/tls.key"]


def test_network_policy_lets_only_sidecars_and_the_injector_reach_redis() -> None:
    base = rendered("")
    policy = find(base, "NetworkPolicy", "budgetwarden-redis")
    namespace = policy["metadata"]["namespace"]
    redis = find(base, "StatefulSet", "budgetwarden-redis")
    selected = [p for p in pods(base) if p.namespace == namespace and selects(policy["spec"]["podSelector"], p.labels)]
    assert [p.owner for p in selected] == [redis]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (redis_container,) = redis["spec"]["template"]["spec"]["containers"]
    assert [p["port"] for p in rule["ports"]] == [container_port({}, redis_container, "redis")] == [6379]
    sidecars, injector = rule["from"]
    assert sidecars == {"namespaceSelector": {}, "podSelector": {"matchLabels": SIDECAR_LABEL}}
    assert selects(
        injector["podSelector"], find(base, "Deployment", INJECTOR)["spec"]["template"]["metadata"]["labels"]
    )
    assert "namespaceSelector" not in injector  # the injector's peer is in the policy's own namespace

    def admitted(pod_namespace: str, labels: dict[str, str]) -> bool:
        return any(
            selects(peer["podSelector"], labels)
            and (
                selects(peer["namespaceSelector"], namespace_labels(pod_namespace))
                if "namespaceSelector" in peer
                else pod_namespace == namespace
            )
            for peer in rule["from"]
        )

    others = [p for p in pods(base) + pods(rendered("examples/agent")) if p.owner["metadata"]["name"] != INJECTOR]
    for pod in others:  # Redis itself, the collector and the (not yet injected) agent are not let in
        assert not admitted(pod.namespace, pod.labels), pod.owner["metadata"]["name"]
    assert admitted("agents", {"app.kubernetes.io/name": "research-agent", **SIDECAR_LABEL})
    assert admitted(namespace, find(base, "Deployment", INJECTOR)["spec"]["template"]["metadata"]["labels"])


def test_injector_is_redundant_and_hardened() -> None:
    base = rendered("")
    deployment = find(base, "Deployment", INJECTOR)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 2
    budget = find(base, "PodDisruptionBudget", INJECTOR)
    assert budget["spec"]["minAvailable"] == 1
    assert selects(budget["spec"]["selector"], labels)
    pod = deployment["spec"]["template"]["spec"]
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(selects(c["labelSelector"], labels) for c in pod["topologySpreadConstraints"])
    container = injector_container(base)
    assert container["image"] == IMAGE
    (sidecar_image,) = flag_values(container["args"], "--sidecar-image")
    assert sidecar_image == container["image"]
    for probe, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        http = container[probe]["httpGet"]
        assert (http["scheme"], http["path"], http["port"]) == ("HTTPS", path, "https"), probe
    assert container_port(pod, container, "https") == 8443
    service = find(base, "Service", INJECTOR)
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(443, "https")]


def test_least_privilege_no_rbac_and_no_api_tokens() -> None:
    for kustomization in [*INSTALLS, "examples/agent"]:
        resources = rendered(kustomization)
        kinds = {r["kind"] for r in resources}
        assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}, kustomization
        for pod in pods(resources):
            assert pod.spec["automountServiceAccountToken"] is False, pod.owner["metadata"]["name"]
    base = rendered("")
    account = find(base, "ServiceAccount", INJECTOR)
    assert account["automountServiceAccountToken"] is False
    assert find(base, "Deployment", INJECTOR)["spec"]["template"]["spec"]["serviceAccountName"] == INJECTOR


def restricted_problems(spec: dict[str, Any], name: str) -> list[str]:
    """Violations of Pod Security "restricted" (and of this project's own rules: read-only root, requests, a memory
    limit) in a pod spec."""
    problems = []
    pod_context = spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"{name}: {field}")
    problems += [f"{name}: hostPath volume" for v in spec.get("volumes", []) if "hostPath" in v]
    for container in list(spec.get("initContainers", [])) + list(spec["containers"]):
        where = f"{name}/{container['name']}"
        context = container.get("securityContext", {})
        if context.get("privileged"):
            problems.append(f"{where}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if "ALL" not in context.get("capabilities", {}).get("drop", []):
            problems.append(f"{where}: capabilities not dropped")
        if set(context.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: capabilities added")
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
            problems.append(f"{where}: runAsNonRoot is not true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            problems.append(f"{where}: runs as uid 0")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: no RuntimeDefault seccomp profile")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: root filesystem writable")
        resources = container.get("resources", {})
        if not {"cpu", "memory"} <= set(resources.get("requests", {})) or "memory" not in resources.get("limits", {}):
            problems.append(f"{where}: no cpu/memory requests or no memory limit")
    return problems


@pytest.mark.parametrize("kustomization", [*INSTALLS, "examples/agent"])
def test_every_pod_meets_pod_security_restricted(kustomization: str) -> None:
    resources = rendered(kustomization)
    for namespace in (r for r in resources if r["kind"] == "Namespace"):
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for pod in pods(resources):
        assert restricted_problems(pod.spec, pod.owner["metadata"]["name"]) == []


def test_restricted_check_catches_violations() -> None:
    spec = copy.deepcopy(find(rendered(""), "Deployment", INJECTOR)["spec"]["template"]["spec"])
    spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    del spec["securityContext"]["seccompProfile"]
    spec["hostNetwork"] = True
    assert len(restricted_problems(spec, "x")) == 3


def test_redis_is_persistent_durable_and_never_evicts() -> None:
    base = rendered("")
    redis = find(base, "StatefulSet", "budgetwarden-redis")
    spec = redis["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = container["args"]
    pairs = dict(zip(args[1::2], args[2::2], strict=False))
    assert pairs["--appendonly"] == "yes"
    assert pairs["--appendfsync"] == "everysec"
    assert pairs["--maxmemory-policy"] == "noeviction"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert mount["mountPath"] == pairs["--dir"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert redis["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in container
    assert "PONG" in " ".join(container["readinessProbe"]["exec"]["command"])
    assert pairs["--port"] == str(container_port(spec, container, "redis"))


def service_url_target(resources: list[Resource], url: str) -> tuple[Resource, int]:
    """The Service a cluster-local URL (scheme://name.namespace.svc:port) points at, and its port."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    name, namespace, svc = parts.hostname.split(".")[:3]
    assert svc == "svc", url
    service = find(resources, "Service", name, namespace)
    assert parts.port in {p["port"] for p in service["spec"]["ports"]}, url
    return service, int(parts.port or 0)


def test_injector_points_sidecars_at_redis_the_collector_and_the_policy() -> None:
    base = rendered("")
    args = injector_container(base)["args"]
    (redis_url,) = flag_values(args, "--redis-url")
    service, port = service_url_target(base, redis_url)
    assert service["metadata"]["name"] == "budgetwarden-redis"
    assert port == 6379
    sidecar_env = dict(value.split("=", 1) for value in flag_values(args, "--sidecar-env"))
    service, port = service_url_target(base, sidecar_env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert (service["metadata"]["name"], port) == ("budgetwarden-otel-collector", 4317)
    assert sidecar_env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    (policy,) = flag_values(args, "--policy-configmap")
    for kustomization in ("", "examples/agent"):
        config_map = find(rendered(kustomization), "ConfigMap", policy)
        assert list(config_map["data"]) == ["policy.yaml"]  # the injector's default --policy-key


@pytest.mark.parametrize("kustomization", [*INSTALLS, "examples/agent"])
def test_mounted_config_maps_and_secrets_exist_or_are_documented(kustomization: str) -> None:
    resources = rendered(kustomization)
    external_secrets = {"budgetwarden-webhook-ca"}  # created by hand: overlays/self-signed/kustomization.yaml
    for pod in pods(resources):
        for volume in pod.spec.get("volumes", []):
            if "configMap" in volume:
                config_map = find(resources, "ConfigMap", volume["configMap"]["name"], pod.namespace)
                for item in volume["configMap"].get("items", []):
                    assert item["key"] in config_map["data"]
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                certificates = [r for r in resources if r["kind"] == "Certificate" and r["spec"]["secretName"] == name]
                assert certificates or name in external_secrets, name


def test_policy_is_the_example_policy_it_validates_and_has_the_example_agents_tenant() -> None:
    text = (K8S / "policy" / "policy.yaml").read_text()
    assert text == (ROOT / "examples" / "policy.yaml").read_text()
    result = subprocess.run(
        [sys.executable, "-m", "budgetwarden", "policy", "validate", str(K8S / "policy" / "policy.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    policy = yaml.safe_load(text)
    (agent,) = pods(rendered("examples/agent"))
    assert agent.annotations["budgetwarden.io/inject"] == "true"
    assert agent.annotations["budgetwarden.io/tenant"] in policy["tenants"]
    assert agent.annotations["budgetwarden.io/task-type"] in policy["task_types"]


def budgetwarden_command_lines() -> list[tuple[str, list[str]]]:
    """(where, words after `budgetwarden`) for every budgetwarden command in the manifests: container args of the
    budgetwarden image, shell scripts run in it, and the commands the comments tell people to run."""
    found: list[tuple[str, list[str]]] = []
    for kustomization in sorted(KUSTOMIZATIONS):
        for pod in pods(rendered(kustomization)):
            for container in pod.containers():
                if container["image"].rsplit(":", 1)[0] != IMAGE.rsplit(":", 1)[0]:
                    continue
                where = f"{kustomization or 'base'}: {pod.owner['metadata']['name']}/{container['name']}"
                command = container.get("command", ["budgetwarden"])
                if command[:1] == ["budgetwarden"]:
                    found.append((where, [*command[1:], *container.get("args", [])]))
                else:
                    assert command[-1] == "-c", where  # a shell script
                    script = container["args"][0].replace("\\\n", " ")
                    for line in script.splitlines():
                        words = shlex.split(line)
                        if words[:1] == ["budgetwarden"]:
                            found.append((where, words[1:]))
    known = subcommands()
    for name in yaml_files():
        for line in comment_text(name).splitlines():
            for match in re.finditer(r"\bbudgetwarden ([a-z-]+)(?=\s|$)([^)`\n]*)", line):
                if match.group(1) in known:
                    found.append((f"{name} (comment)", shlex.split(match.group(1) + match.group(2))))
    return found


def test_every_budgetwarden_command_line_uses_real_subcommands_and_flags() -> None:
    lines = budgetwarden_command_lines()
    seen = {words[0] for _, words in lines}
    # The injector, the example agent's check and report, and the documented policy/CA commands are all covered.
    assert {"inject-webhook", "check", "report", "policy"} <= seen
    for where, words in lines:
        check_command_line(words, where)


def test_command_line_check_catches_unknown_flags_and_subcommands() -> None:
    with pytest.raises(AssertionError, match="has no --no-such-flag"):
        check_command_line(["serve", "--no-such-flag=1"], "test")
    with pytest.raises(AssertionError, match="no subcommand"):
        check_command_line(["inject"], "test")


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
    """The self-signed overlay's documented steps: make the CA, put it where the Secret is mounted, patch caBundle."""
    docs = comment_text("overlays/self-signed/kustomization.yaml")
    step1 = re.search(r"CA_BUNDLE=\$\((budgetwarden [^)]*)\)", docs)
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
    step3 = re.search(r'--type=json -p "(\[.*?\])"', docs, re.DOTALL)
    assert step3 is not None
    operations = json.loads(step3.group(1).replace('\\"', '"').replace("$CA_BUNDLE", bundle))
    webhook = find(resources, "MutatingWebhookConfiguration", INJECTOR)
    patched = jsonpatch.apply_patch(webhook, operations)
    validate(patched)
    bundles = {entry["clientConfig"].get("caBundle") for entry in patched["webhooks"]}
    assert bundles == {bundle}  # every entry
    return base64.b64decode(bundle)


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
def injector(resources: list[Resource], tmp: Path) -> Iterator[Client]:
    """The injector as its Deployment runs it (args, env), its file paths under ``tmp``, on a free loopback port."""
    deployment = find(resources, "Deployment", INJECTOR)
    container = injector_container(resources)
    mounts = tmp / "mounts"
    args = [arg for arg in container["args"] if not arg.startswith("--listen")]
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
    agents = find(rendered("examples/agent"), "Namespace", "agents")
    (path,) = [
        entry["clientConfig"]["service"]["path"]
        for entry in webhook["webhooks"]
        if selects(entry["namespaceSelector"], namespace_labels(agents))
        and selects(entry["objectSelector"], pod["metadata"]["labels"])
    ]
    review = admission_review(pod)
    with injector(resources, tmp) as client:
        status, body = client.request("POST", f"{path}?timeout=5s", json.dumps(review).encode())
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
    (image,) = flag_values(container["args"], "--sidecar-image")
    assert sidecar["image"] == image
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
    config_map = find(rendered("examples/agent"), "ConfigMap", volume["configMap"]["name"], "agents")
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
    sidecar_env = env_of(injected("").sidecar)
    names = {name for name in sidecar_env if name.startswith("BUDGETWARDEN_")}
    assert {"BUDGETWARDEN_TENANT", "BUDGETWARDEN_REDIS_URL"} <= names
    unknown = names - env_names("serve")
    assert not unknown, f"`budgetwarden serve` reads no {sorted(unknown)}: the setting would be ignored"


@pytest.mark.slow
def test_injected_example_pod_is_let_through_the_redis_network_policy(injected: Any) -> None:
    result: Injected = injected("")
    policy = find(result.resources, "NetworkPolicy", "budgetwarden-redis")
    labels = result.pod["metadata"].get("labels", {})
    (rule,) = policy["spec"]["ingress"]
    assert any(
        selects(peer["podSelector"], labels) and selects(peer.get("namespaceSelector", {}), namespace_labels("agents"))
        for peer in rule["from"]
        if "namespaceSelector" in peer
    ), f"the injector labels the pod {labels}: the NetworkPolicy wants {SIDECAR_LABEL}"


@pytest.mark.slow
def test_reinjecting_the_injected_example_pod_changes_nothing(injected: Any, tmp_path: Path) -> None:
    result: Injected = injected("")
    review = admission_review(result.pod)
    with injector(result.resources, tmp_path) as client:
        status, body = client.request("POST", "/mutate-all", json.dumps(review).encode())
    assert status == 200
    response = json.loads(body)["response"]
    assert response["allowed"] is True
    patch = json.loads(base64.b64decode(response["patch"])) if "patch" in response else []
    assert patch == []
