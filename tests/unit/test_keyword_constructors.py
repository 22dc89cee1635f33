"""Value objects with many fields (several of one type: tokens, limits, ids) are built with keywords only, so that a
call site says which figure is which; `CheckResult(verdict, requested, rid, lease, scopes, ...)` cannot come back."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "server" / "budgetwarden"
MANY_FIELDS = 4
# A table of the webhook's flags, one a line: a name, its help and its kind read best in a row.
POSITIONAL_ALLOWED = {"budgetwarden.inject._config._Option"}


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts[-1] != "__main__":
            names.append(".".join(parts))
    return names


def dataclasses_with_many_fields() -> list[type]:
    found = []
    for name in module_names():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (
                inspect.isclass(value)
                and value.__module__ == name
                and dataclasses.is_dataclass(value)
                and len(dataclasses.fields(value)) > MANY_FIELDS
                and f"{name}.{value.__qualname__}" not in POSITIONAL_ALLOWED
            ):
                found.append(value)
    return found


CLASSES = dataclasses_with_many_fields()


def test_the_rule_sees_the_value_objects() -> None:
    names = {cls.__name__ for cls in CLASSES}
    assert {"CheckResult", "CheckInput", "UsageInput", "Verdict", "Counter", "Applied", "StepCheck"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: f"{cls.__module__}.{cls.__qualname__}")
def test_a_dataclass_with_many_fields_takes_keywords_only(cls: type) -> None:
    positional = [
        p.name for p in inspect.signature(cls).parameters.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY
    ]
    assert positional == []
