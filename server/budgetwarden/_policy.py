"""The policy file: tenants with windowed limits, task types with per-task and per-step ceilings.

Loaded from YAML and validated with pydantic; a validation error names the file, the line and the field.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from budgetwarden._model import MAX_LIMIT_TOKENS, Window

TokenLimit = Annotated[int, Field(ge=0, le=MAX_LIMIT_TOKENS)]

WINDOW_NAMES: dict[str, Window] = {
    "minute": Window.MINUTE,
    "hour": Window.HOUR,
    "day": Window.DAY,
    "month": Window.MONTH,
}
WindowName = Literal["minute", "hour", "day", "month"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limit(_Strict):
    """A limit on one scope. A scope without a limit is not enforced."""

    tokens: TokenLimit | None = None


class TenantPolicy(_Strict):
    time_zone: str = "UTC"
    windows: dict[WindowName, Limit] = Field(default_factory=dict)

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as 'Europe/Berlin')") from None
        return value

    def window_limits(self) -> list[tuple[Window, int]]:
        """The enforced windows, shortest first."""
        limits = [
            (WINDOW_NAMES[name], limit.tokens) for name, limit in self.windows.items() if limit.tokens is not None
        ]
        return sorted(limits)


class TaskTypePolicy(_Strict):
    per_task: Limit = Field(default_factory=Limit)
    per_step: Limit = Field(default_factory=Limit)
    lease_seconds: Annotated[int, Field(ge=1, le=7 * 86400)] | None = None


class Policy(_Strict):
    version: Literal[1] = 1
    unknown_tenants: Literal["default", "reject"] = "default"
    default_tenant: TenantPolicy = Field(default_factory=TenantPolicy)
    tenants: dict[str, TenantPolicy] = Field(default_factory=dict)
    # task_types comes before default_task_type so that the latter's validator can see the former.
    task_types: dict[str, TaskTypePolicy] = Field(default_factory=dict)
    default_task_type: str | None = None

    @field_validator("default_task_type")
    @classmethod
    def _default_task_type_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        known = info.data.get("task_types")
        if value is not None and known is not None and value not in known:
            raise ValueError(f"{value!r} is not one of task_types ({', '.join(sorted(known)) or 'none defined'})")
        return value

    def tenant(self, tenant_id: str) -> TenantPolicy | None:
        found = self.tenants.get(tenant_id)
        if found is not None:
            return found
        return self.default_tenant if self.unknown_tenants == "default" else None

    def task_type(self, name: str) -> tuple[str, TaskTypePolicy] | None:
        """Resolve a requested task type (empty: the default) to its name and policy."""
        if name:
            found = self.task_types.get(name)
            if found is not None:
                return name, found
        if self.default_task_type is None:
            return None
        return self.default_task_type, self.task_types[self.default_task_type]


class PolicyError(Exception):
    """A policy file that cannot be used; ``str()`` names the file, line and field of every problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}:{problem}" for problem in problems))


class LoadedPolicy:
    """A validated policy with where it came from and a version derived from its content."""

    __slots__ = ("policy", "source", "version")

    def __init__(self, policy: Policy, source: str, version: str) -> None:
        self.policy = policy
        self.source = source
        self.version = version


def load_policy(path: Path) -> LoadedPolicy:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(str(path), [f"0: cannot read: {exc}"]) from None
    return parse_policy(text, str(path))


def default_policy() -> LoadedPolicy:
    """The policy used when none is configured (``server/budgetwarden/default_policy.yaml``)."""
    text = resources.files("budgetwarden").joinpath("default_policy.yaml").read_text(encoding="utf-8")
    return parse_policy(text, "<built-in default policy>")


def parse_policy(text: str, source: str) -> LoadedPolicy:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        raise PolicyError(source, [f"{line}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if root is None:
        raise PolicyError(source, ["1: the file is empty"])
    lines: dict[tuple[str | int, ...], int] = {}
    duplicates: list[str] = []
    data = _to_python(root, (), lines, duplicates)
    if duplicates:
        raise PolicyError(source, duplicates)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(source, list(_describe(exc, lines))) from None
    version = hashlib.sha256(text.encode()).hexdigest()[:12]
    return LoadedPolicy(policy, source, version)


def _to_python(
    node: yaml.Node, path: tuple[str | int, ...], lines: dict[tuple[str | int, ...], int], duplicates: list[str]
) -> Any:
    """Build plain data from a YAML node tree, remembering the line of every mapping key and sequence item."""
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            child = (*path, key)
            line = key_node.start_mark.line + 1
            if key in mapping:
                where = ".".join(str(part) for part in child)
                duplicates.append(f"{line}: {where}: duplicate key (first given on line {lines[child]})")
                continue
            lines[child] = line
            mapping[key] = _to_python(value_node, child, lines, duplicates)
        return mapping
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, (*path, index), lines, duplicates) for index, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _describe(exc: ValidationError, lines: dict[tuple[str | int, ...], int]) -> Iterator[str]:
    for error in exc.errors():
        loc = tuple(part for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-")))
        line = 0
        for depth in range(len(loc), -1, -1):
            if loc[:depth] in lines:
                line = lines[loc[:depth]]
                break
        where = ".".join(str(part) for part in loc) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        yield f"{line}: {where}: {message}"
