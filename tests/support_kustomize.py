"""A small renderer for exactly the kustomize features that k8s/ uses (there is no kustomize binary here).

Supported, with kustomize's semantics:
- ``resources``: YAML files (in or below the kustomization's folder, like kustomize's default load restrictor) and
  folders holding another kustomization (anywhere), rendered first;
- ``configMapGenerator`` with ``name``, optional ``namespace`` and ``files`` (``key=path`` or ``path``), and
  ``generatorOptions`` with ``labels``, ``annotations`` and ``disableNameSuffixHash: true`` (the hash suffix and the
  reference rewriting that comes with it are not implemented, so a generator without it is refused);
- ``patches`` given inline (``patch``) or as a file (``path``): a list of RFC 6902 operations (applied with the
  ``jsonpatch`` library to every resource that ``target`` selects by group, version, kind, name and namespace, all
  exact) or a strategic-merge patch that is only ``$patch: delete`` of a whole resource;
- ``namespace``: set on every namespaced resource, after the patches (as kustomize orders its transformers).

Anything else in a kustomization (a field, a patch form, a regex selector) raises ``UnsupportedError`` rather than being
silently ignored, so a manifest that starts using a feature this renderer lacks fails the tests instead of rendering
wrongly.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "patches",
    "configMapGenerator",
    "generatorOptions",
}
GENERATOR_FIELDS = {"name", "namespace", "files"}
GENERATOR_OPTION_FIELDS = {"disableNameSuffixHash", "labels", "annotations"}
PATCH_FIELDS = {"path", "patch", "target"}
TARGET_FIELDS = {"group", "version", "kind", "name", "namespace"}
# Kinds without a namespace (kustomize knows these from the OpenAPI schema); every other kind is namespaced.
CLUSTER_SCOPED = {
    "Namespace",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "ClusterRole",
    "ClusterRoleBinding",
    "ClusterIssuer",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
}

Resource = dict[str, Any]


class UnsupportedError(Exception):
    """The kustomization uses something this renderer does not implement."""


class RenderError(Exception):
    """The kustomization is wrong (kustomize would refuse it too)."""


def render(directory: Path) -> list[Resource]:
    """Render the kustomization in ``directory`` like ``kustomize build directory``."""
    directory = directory.resolve()
    kustomization = _load_one(directory / "kustomization.yaml")
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    if unknown:
        raise UnsupportedError(f"{directory}: kustomization fields {sorted(unknown)}")
    if kustomization.get("kind", "Kustomization") != "Kustomization":
        raise UnsupportedError(f"{directory}: kind {kustomization['kind']}")

    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            resources.extend(render(path))
        elif path.is_file():
            _check_within(directory, path)
            resources.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)
        else:
            raise RenderError(f"{directory}: resource {entry} does not exist")

    options = kustomization.get("generatorOptions", {})
    _check_fields(options, GENERATOR_OPTION_FIELDS, f"{directory}: generatorOptions")
    for generator in kustomization.get("configMapGenerator", []):
        resources.append(_config_map(directory, generator, options))

    for patch in kustomization.get("patches", []):
        resources = _apply_patch(directory, patch, resources)

    namespace = kustomization.get("namespace")
    if namespace is not None:
        for resource in resources:
            _set_namespace(resource, namespace)

    seen: set[tuple[str, str, str, str]] = set()
    for resource in resources:
        key = resource_id(resource)
        if key in seen:
            raise RenderError(f"{directory}: two resources with the id {key}")
        seen.add(key)
    return resources


def resource_id(resource: Resource) -> tuple[str, str, str, str]:
    """(group, kind, namespace, name): what kustomize calls a resource's id."""
    metadata = resource.get("metadata", {})
    return (_group(resource), resource["kind"], metadata.get("namespace", ""), metadata["name"])


def _group(resource: Resource) -> str:
    api_version: str = resource["apiVersion"]
    return api_version.rpartition("/")[0]


def _load_one(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RenderError(f"{path} does not exist")
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict):
        raise RenderError(f"{path} is not a mapping")
    return loaded


def _check_within(directory: Path, path: Path) -> None:
    if not path.is_relative_to(directory):
        raise RenderError(f"{path} is not in or below {directory} (kustomize's load restrictor refuses it)")


def _check_fields(values: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(values) - allowed
    if unknown:
        raise UnsupportedError(f"{where}: fields {sorted(unknown)}")


def _config_map(directory: Path, generator: dict[str, Any], options: dict[str, Any]) -> Resource:
    where = f"{directory}: configMapGenerator {generator.get('name')}"
    _check_fields(generator, GENERATOR_FIELDS, where)
    if options.get("disableNameSuffixHash") is not True:
        raise UnsupportedError(f"{where}: name hash suffixes (set generatorOptions.disableNameSuffixHash: true)")
    data: dict[str, str] = {}
    for entry in generator.get("files", []):
        key, _, file = entry.rpartition("=")
        path = (directory / file).resolve()
        _check_within(directory, path)
        key = key or path.name
        if key in data:
            raise RenderError(f"{where}: key {key} twice")
        data[key] = path.read_text()
    metadata: dict[str, Any] = {"name": generator["name"]}
    if "namespace" in generator:
        metadata["namespace"] = generator["namespace"]
    for field in ("labels", "annotations"):
        if options.get(field):
            metadata[field] = dict(options[field])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def _apply_patch(directory: Path, entry: dict[str, Any], resources: list[Resource]) -> list[Resource]:
    where = f"{directory}: patch {entry.get('path', '(inline)')}"
    _check_fields(entry, PATCH_FIELDS, where)
    if ("path" in entry) == ("patch" in entry):
        raise RenderError(f"{where}: needs exactly one of path and patch")
    if "path" in entry:
        path = (directory / entry["path"]).resolve()
        _check_within(directory, path)
        text = path.read_text()
    else:
        text = entry["patch"]
    body = yaml.safe_load(text)
    target = entry.get("target")
    if isinstance(body, list):
        if target is None:
            raise RenderError(f"{where}: a JSON 6902 patch needs a target")
        _check_fields(target, TARGET_FIELDS, f"{where}: target")
        matched = [resource for resource in resources if _selected(resource, target)]
        if not matched:
            raise RenderError(f"{where}: target {target} selects nothing")
        operations = jsonpatch.JsonPatch(body)
        patched = {id(resource): operations.apply(copy.deepcopy(resource)) for resource in matched}
        return [patched.get(id(resource), resource) for resource in resources]
    if isinstance(body, dict):
        if target is not None:
            raise UnsupportedError(f"{where}: a target on a strategic-merge patch")
        if set(body) - {"apiVersion", "kind", "metadata", "$patch"} or body.get("$patch") != "delete":
            raise UnsupportedError(f"{where}: strategic-merge patches other than `$patch: delete` of a whole resource")
        selector = {"kind": body["kind"], "name": body["metadata"]["name"], "group": _group(body)}
        if "namespace" in body["metadata"]:
            selector["namespace"] = body["metadata"]["namespace"]
        kept = [resource for resource in resources if not _selected(resource, selector)]
        if len(kept) != len(resources) - 1:
            raise RenderError(f"{where}: `$patch: delete` must select exactly one resource, not {selector}")
        return kept
    raise RenderError(f"{where}: neither a list of operations nor a mapping")


def _selected(resource: Resource, target: dict[str, str]) -> bool:
    metadata = resource.get("metadata", {})
    group, _, version = resource["apiVersion"].rpartition("/")
    actual = {
        "group": group,
        "version": version,
        "kind": resource["kind"],
        "name": metadata.get("name", ""),
        "namespace": metadata.get("namespace", ""),
    }
    for field, wanted in target.items():
        # kustomize matches name and namespace as anchored regular expressions; only plain names are supported.
        if any(char in wanted for char in "*^$[]()|+?\\{}"):
            raise UnsupportedError(f"target {field} {wanted!r}: regular expressions")
        if actual[field] != wanted:
            return False
    return True


def _set_namespace(resource: Resource, namespace: str) -> None:
    metadata = resource.setdefault("metadata", {})
    if resource["kind"] == "Namespace":
        # kustomize renames Namespace objects to the kustomization's namespace; only the no-op case is allowed here.
        if metadata["name"] != namespace:
            raise UnsupportedError(f"namespace {namespace!r} would rename the Namespace {metadata['name']!r}")
        return
    if resource["kind"] in CLUSTER_SCOPED:
        return
    metadata["namespace"] = namespace
