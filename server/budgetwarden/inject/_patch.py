"""What the injector adds to a pod: the settings its annotations ask for, the sidecar container and the JSONPatch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._config import InjectConfig
from ._exceptions import AnnotationError
from ._values import (
    _FAIL_MODES,
    _LOG_LEVELS,
    ADDR_ENV,
    CPU,
    CPU_LIMIT,
    FAIL_MODE,
    LOG_LEVEL,
    MEMORY,
    MEMORY_LIMIT,
    POLICY_MOUNT,
    POLICY_VOLUME,
    SIDECAR_LABEL,
    SIDECAR_NAME,
    STATUS,
    STATUS_INJECTED,
    TASK_TYPE,
    TENANT,
    _ident,
    _quantity,
)


@dataclass(frozen=True, kw_only=True)
class PodSettings:
    tenant: str
    task_type: str
    fail_mode: str
    log_level: str
    cpu_request: str
    cpu_limit: str | None
    memory_request: str
    memory_limit: str | None


def _resources(
    annotations: Mapping[str, str], request_key: str, limit_key: str, default_request: str, default_limit: str
) -> tuple[str, str | None]:
    request = annotations.get(request_key, default_request).strip()
    limit_text = annotations.get(limit_key, default_limit).strip()
    try:
        request_value = _quantity(request)
    except ValueError as exc:
        raise AnnotationError(f"{request_key}: {exc}") from None
    try:
        limit_value = _quantity(limit_text, allow_none=True)
    except ValueError as exc:
        raise AnnotationError(f"{limit_key}: {exc}") from None
    assert request_value is not None
    if limit_value is not None and request_value > limit_value:
        if request_key in annotations:
            raise AnnotationError(f"{request_key}: {request} is more than the limit {limit_text} ({limit_key})")
        request = limit_text  # only the limit was lowered: the request follows it, as Kubernetes defaults it
    return request, (None if limit_value is None else limit_text)


def pod_settings(config: InjectConfig, annotations: Mapping[str, str], namespace: str) -> PodSettings:
    """What the pod's annotations ask for, over the webhook's defaults; AnnotationError names a bad one."""
    tenant_annotation = annotations.get(TENANT)
    if config.tenant_source == "namespace":
        if tenant_annotation is not None and tenant_annotation != namespace:
            raise AnnotationError(
                f"{TENANT}: {tenant_annotation!r} is not allowed: this injector binds every pod to its namespace "
                f"({namespace!r}); remove the annotation"
            )
        tenant = namespace
    else:
        tenant = tenant_annotation if tenant_annotation is not None else (config.default_tenant or namespace)
    try:
        _ident(tenant)
    except ValueError as exc:
        raise AnnotationError(f"{TENANT}: {exc}") from None
    task_type = annotations.get(TASK_TYPE, "")
    if task_type:
        try:
            _ident(task_type)
        except ValueError as exc:
            raise AnnotationError(f"{TASK_TYPE}: {exc}") from None
    fail_mode = annotations.get(FAIL_MODE, config.sidecar_fail_mode).strip().lower()
    if fail_mode not in _FAIL_MODES:
        raise AnnotationError(f"{FAIL_MODE}: {annotations[FAIL_MODE]!r} is not open or closed")
    log_level = annotations.get(LOG_LEVEL, config.sidecar_log_level).strip().upper()
    if log_level not in _LOG_LEVELS:
        raise AnnotationError(f"{LOG_LEVEL}: {annotations[LOG_LEVEL]!r} is not DEBUG, INFO, WARNING or ERROR")
    cpu_request, cpu_limit = _resources(
        annotations, CPU, CPU_LIMIT, config.sidecar_cpu_request, config.sidecar_cpu_limit
    )
    memory_request, memory_limit = _resources(
        annotations, MEMORY, MEMORY_LIMIT, config.sidecar_memory_request, config.sidecar_memory_limit
    )
    return PodSettings(
        tenant=tenant,
        task_type=task_type,
        fail_mode=fail_mode,
        log_level=log_level,
        cpu_request=cpu_request,
        cpu_limit=cpu_limit,
        memory_request=memory_request,
        memory_limit=memory_limit,
    )


def pointer(*parts: str | int) -> str:
    """A JSON pointer (RFC 6901): ``~`` becomes ``~0`` and ``/`` becomes ``~1`` in each part."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def sidecar_container(config: InjectConfig, settings: PodSettings) -> dict[str, Any]:
    """The budgetwarden container: budget API on loopback, grpc.health.v1 on the pod IP for the kubelet's probes."""
    args = [
        "serve",
        "--listen",
        f"127.0.0.1:{config.sidecar_port}",
        "--health-listen",
        f"0.0.0.0:{config.sidecar_health_port}",
        "--fail-mode",
        settings.fail_mode,
        "--log-level",
        settings.log_level,
    ]
    if config.policy_configmap:
        args += ["--policy-file", f"{POLICY_MOUNT}/{config.policy_key}"]
    if config.sidecar_metrics_port:
        # Scraped on the pod IP (the sidecar's default is loopback).
        args += ["--metrics-port", str(config.sidecar_metrics_port), "--metrics-host", "0.0.0.0"]
    env: list[dict[str, Any]] = [{"name": "BUDGETWARDEN_TENANT", "value": settings.tenant}]
    if settings.task_type:
        env.append({"name": "BUDGETWARDEN_DEFAULT_TASK_TYPE", "value": settings.task_type})
    # The URL travels in the environment, never in args: it may carry a password, and args show in `ps`.
    if config.redis_url_secret:
        name, key = config.redis_secret_ref
        env.append({"name": "BUDGETWARDEN_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": name, "key": key}}})
    else:
        env.append({"name": "BUDGETWARDEN_REDIS_URL", "value": config.redis_url})
    if config.redis_cluster:
        env.append({"name": "BUDGETWARDEN_REDIS_CLUSTER", "value": "true"})
    for name, path in (
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_UID", "metadata.uid"),
        ("NODE_NAME", "spec.nodeName"),
    ):
        env.append({"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}})
    env += [{"name": name, "value": value} for name, value in config.sidecar_env]
    requests = {"cpu": settings.cpu_request, "memory": settings.memory_request}
    limits = {name: value for name, value in (("cpu", settings.cpu_limit), ("memory", settings.memory_limit)) if value}
    resources: dict[str, Any] = {"requests": requests}
    if limits:
        resources["limits"] = limits

    def probe(period: int, failures: int, service: str | None = None) -> dict[str, Any]:
        grpc: dict[str, Any] = {"port": config.sidecar_health_port}
        if service is not None:
            grpc["service"] = service
        return {
            "grpc": grpc,
            "periodSeconds": period,
            "timeoutSeconds": 1,
            "failureThreshold": failures,
        }

    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": config.sidecar_image,
        "imagePullPolicy": config.sidecar_image_pull_policy,
        "command": ["budgetwarden"],
        "args": args,
        "env": env,
        "resources": resources,
        # Up to a minute to become ready; with a native sidecar the app containers start only once this passes.
        # Startup and liveness ask for "liveness" (the process serves), never for Redis: a store outage must not get
        # the sidecar restarted. Readiness ("") is NOT_SERVING while Redis does not answer.
        "startupProbe": probe(1, 60, "liveness"),
        "readinessProbe": probe(5, 3),
        "livenessProbe": probe(10, 3, "liveness"),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": config.sidecar_user,
            "runAsGroup": config.sidecar_user,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if config.policy_configmap:
        container["volumeMounts"] = [{"name": POLICY_VOLUME, "mountPath": POLICY_MOUNT, "readOnly": True}]
    if not config.legacy_sidecar:
        # A native sidecar (Kubernetes 1.29+): started before the app containers, stopped after them.
        container["restartPolicy"] = "Always"
    return container


def _addr_ops(config: InjectConfig, containers: Sequence[Any]) -> list[dict[str, Any]]:
    """BUDGETWARDEN_ADDR for every app container that has no such variable yet."""
    ops: list[dict[str, Any]] = []
    entry = {"name": ADDR_ENV, "value": f"127.0.0.1:{config.sidecar_port}"}
    for i, container in enumerate(containers):
        if not isinstance(container, dict) or container.get("name") == SIDECAR_NAME:
            continue
        env = container.get("env")
        if isinstance(env, list):
            if any(isinstance(e, dict) and e.get("name") == ADDR_ENV for e in env):
                continue
            ops.append({"op": "add", "path": pointer("spec", "containers", i, "env", "-"), "value": entry})
        else:
            ops.append({"op": "add", "path": pointer("spec", "containers", i, "env"), "value": [entry]})
    return ops


def _append(ops: list[dict[str, Any]], parent: Mapping[str, Any], parts: tuple[str, ...], value: Any) -> None:
    """Append to the list at ``parts``: ``add .../-`` when it exists, else ``add`` the whole list."""
    if isinstance(parent.get(parts[-1]), list):
        ops.append({"op": "add", "path": pointer(*parts, "-"), "value": value})
    else:
        ops.append({"op": "add", "path": pointer(*parts), "value": [value]})


def injection_patch(config: InjectConfig, pod: Mapping[str, Any], settings: PodSettings) -> list[dict[str, Any]]:
    """The JSONPatch that injects the sidecar into a pod that has none."""
    ops: list[dict[str, Any]] = []
    metadata = pod.get("metadata")
    if not isinstance(metadata, dict):
        value = {"annotations": {STATUS: STATUS_INJECTED}, "labels": {SIDECAR_LABEL: STATUS_INJECTED}}
        ops.append({"op": "add", "path": "/metadata", "value": value})
    else:
        for field, key in (("annotations", STATUS), ("labels", SIDECAR_LABEL)):
            if not isinstance(metadata.get(field), dict):
                ops.append({"op": "add", "path": f"/metadata/{field}", "value": {key: STATUS_INJECTED}})
            else:
                ops.append({"op": "add", "path": pointer("metadata", field, key), "value": STATUS_INJECTED})
    spec = pod["spec"]
    if config.policy_configmap:
        volumes = spec.get("volumes")
        taken = isinstance(volumes, list) and any(
            isinstance(v, dict) and v.get("name") == POLICY_VOLUME for v in volumes
        )
        # A volume of that name already in the pod is the pod's own choice of policy source: it is mounted as is.
        if not taken:
            volume = {
                "name": POLICY_VOLUME,
                "configMap": {"name": config.policy_configmap, "defaultMode": 0o444},
            }
            _append(ops, spec, ("spec", "volumes"), volume)
    container = sidecar_container(config, settings)
    containers = spec["containers"]
    ops += _addr_ops(config, containers)  # before the sidecar is appended, so the indices hold
    if config.legacy_sidecar:
        ops.append({"op": "add", "path": "/spec/containers/-", "value": container})
    else:
        # Last of the init containers: earlier init containers and sidecars (a service mesh's proxy) run first, and
        # the app containers start only once its startup probe passes. Native sidecars stop in reverse order, after
        # every app container has exited, so the agent's last usage reports still reach it.
        _append(ops, spec, ("spec", "initContainers"), container)
    return ops
