"""The policy file: tenants with windowed limits, task types with ceilings, thresholds and degrade ladders, and a
model table with prices and tokenizer encodings.

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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ._cost import micros_to_usd, usd_to_micros
from ._model import MAX_LIMIT_TOKENS, MAX_LIMIT_USD, MAX_TOKENS_PER_FIELD, Window

TokenLimit = Annotated[int, Field(ge=0, le=MAX_LIMIT_TOKENS)]
UsdLimit = Annotated[float, Field(ge=0, le=micros_to_usd(MAX_LIMIT_USD), allow_inf_nan=False)]
UsdPrice = Annotated[float, Field(ge=0, le=1_000_000, allow_inf_nan=False)]
Fraction = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
TokenCap = Annotated[int, Field(ge=0, le=MAX_TOKENS_PER_FIELD)]
BASIS_POINTS = 10_000

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
    """A limit on one scope, in tokens and/or USD; the tighter binds. A scope without a limit is not enforced."""

    tokens: TokenLimit | None = None
    usd: UsdLimit | None = None

    @property
    def usd_micros(self) -> int | None:
        return None if self.usd is None else usd_to_micros(self.usd)

    @property
    def is_set(self) -> bool:
        return self.tokens is not None or self.usd is not None


class ModelPolicy(_Strict):
    """A model's prices (USD per million tokens) and tokenizer encoding."""

    input_usd_per_mtok: UsdPrice = 0.0
    output_usd_per_mtok: UsdPrice = 0.0
    # Unset: the input price.
    cached_input_usd_per_mtok: UsdPrice | None = None
    encoding: str = "cl100k_base"
    # The cheaper model a `model: cheaper` degrade rung switches to.
    degrade_to: str | None = None
    # gen_ai.provider.name in metrics (openai, anthropic, aws.bedrock, ...).
    provider: str = ""

    @property
    def input_micros_per_mtok(self) -> int:
        return usd_to_micros(self.input_usd_per_mtok)

    @property
    def output_micros_per_mtok(self) -> int:
        return usd_to_micros(self.output_usd_per_mtok)

    @property
    def cached_input_micros_per_mtok(self) -> int:
        cached = self.cached_input_usd_per_mtok
        return self.input_micros_per_mtok if cached is None else usd_to_micros(cached)


# Prices assumed for a model that is not in the table (and no default_model is given): deliberately high, so that
# an unknown model can never be used to slip past a cost budget.
BUILTIN_DEFAULT_MODEL = ModelPolicy(
    input_usd_per_mtok=15.0, output_usd_per_mtok=75.0, cached_input_usd_per_mtok=15.0, encoding="cl100k_base"
)


class Rung(_Strict):
    """One rung of a degrade ladder. Rungs are cumulative: rung N applies its own changes on top of rungs 1..N-1."""

    name: str
    # "cheaper" switches to the requested model's degrade_to; any other value names a model of the table.
    model: str | None = None
    max_context_tokens: TokenCap | None = None
    max_output_tokens: TokenCap | None = None
    max_tool_calls: Annotated[int, Field(ge=0, le=100_000)] | None = None

    @model_validator(mode="after")
    def _changes_something(self) -> Rung:
        changes = (self.model, self.max_context_tokens, self.max_output_tokens, self.max_tool_calls)
        if all(change is None for change in changes):
            raise ValueError(
                "a rung needs at least one of model, max_context_tokens, max_output_tokens, max_tool_calls"
            )
        return self


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

    def window_limits(self) -> list[tuple[Window, Limit]]:
        """The enforced windows, shortest first."""
        limits = [(WINDOW_NAMES[name], limit) for name, limit in self.windows.items() if limit.is_set]
        return sorted(limits, key=lambda item: item[0])


LeaseSeconds = Annotated[int, Field(ge=1, le=7 * 86400)]
# The shortest lease a step gets unless the policy says otherwise. A lapsed lease frees its budget before its usage is
# known, so with ceiling C a task is granted at most C per minimum lease while its reports run late.
DEFAULT_MIN_LEASE_SECONDS = 60


class TaskTypePolicy(_Strict):
    per_task: Limit = Field(default_factory=Limit)
    per_step: Limit = Field(default_factory=Limit)
    lease_seconds: LeaseSeconds | None = None
    # Caller leases shorter than this are lengthened to it. Unset: the policy's min_lease_seconds.
    min_lease_seconds: LeaseSeconds | None = None
    # Fraction of the task ceiling above which steps are degraded (with the ladder) instead of allowed as asked.
    soft_threshold: Fraction | None = None
    # Fraction of the task ceiling at which the task must stop at a checkpoint and wait for an approval.
    checkpoint_threshold: Fraction | None = None
    degrade: list[Rung] = Field(default_factory=list)

    @model_validator(mode="after")
    def _thresholds_in_order(self) -> TaskTypePolicy:
        soft, checkpoint = self.soft_threshold, self.checkpoint_threshold
        if soft is not None and checkpoint is not None and soft > checkpoint:
            raise ValueError(f"soft_threshold ({soft}) must not be above checkpoint_threshold ({checkpoint})")
        names = [rung.name for rung in self.degrade]
        if len(set(names)) != len(names):
            raise ValueError("degrade rung names must be unique")
        return self

    @property
    def soft_bp(self) -> int | None:
        return None if self.soft_threshold is None else round(self.soft_threshold * BASIS_POINTS)

    @property
    def checkpoint_bp(self) -> int | None:
        return None if self.checkpoint_threshold is None else round(self.checkpoint_threshold * BASIS_POINTS)


class Policy(_Strict):
    version: Literal[1] = 1
    unknown_tenants: Literal["default", "reject"] = "default"
    default_tenant: TenantPolicy = Field(default_factory=TenantPolicy)
    tenants: dict[str, TenantPolicy] = Field(default_factory=dict)
    # models and task_types come before what refers to them, so that validators can see them.
    models: dict[str, ModelPolicy] = Field(default_factory=dict)
    default_model: ModelPolicy = BUILTIN_DEFAULT_MODEL
    task_types: dict[str, TaskTypePolicy] = Field(default_factory=dict)
    default_task_type: str | None = None
    # The minimum lease of every task type that sets none of its own.
    min_lease_seconds: LeaseSeconds = DEFAULT_MIN_LEASE_SECONDS

    @field_validator("models")
    @classmethod
    def _degrade_targets_exist(cls, models: dict[str, ModelPolicy]) -> dict[str, ModelPolicy]:
        for name, model in models.items():
            if model.degrade_to is not None and model.degrade_to not in models:
                raise ValueError(f"{name}.degrade_to: {model.degrade_to!r} is not one of models")
        return models

    @field_validator("task_types")
    @classmethod
    def _rung_models_exist(
        cls, task_types: dict[str, TaskTypePolicy], info: ValidationInfo
    ) -> dict[str, TaskTypePolicy]:
        models = info.data.get("models") or {}
        for name, rules in task_types.items():
            for i, rung in enumerate(rules.degrade):
                if rung.model not in (None, "cheaper") and rung.model not in models:
                    raise ValueError(
                        f"{name}.degrade[{i}].model: {rung.model!r} is neither 'cheaper' nor one of models"
                    )
        return task_types

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

    def model(self, name: str) -> tuple[ModelPolicy, bool]:
        """The model's prices and encoding, and whether they were assumed (the model is not in the table)."""
        found = self.models.get(name)
        return (self.default_model, True) if found is None else (found, False)

    def min_lease(self, task_type: str) -> int:
        """The shortest lease, in seconds, a step of this (resolved) task type is given."""
        rules = self.task_types.get(task_type)
        if rules is not None and rules.min_lease_seconds is not None:
            return rules.min_lease_seconds
        return self.min_lease_seconds

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
    """The policy used when none is configured (``server/budgetwarden/domain/default_policy.yaml``)."""
    text = resources.files("budgetwarden.domain").joinpath("default_policy.yaml").read_text(encoding="utf-8")
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
