"""The ids the store issues and reads back (store/_keys.py): checkpoint ids and fail-open reservation ids."""

from __future__ import annotations

import pytest

from budgetwarden.store import checkpoint_id, fail_open_id, parse_checkpoint_id, parse_fail_open_id
from budgetwarden.store._keys import checkpoint_prefix


@pytest.mark.parametrize(
    ("tenant_id", "task_id"),
    [("acme", "t1"), ("a.b", "c.d.e"), ("ünï", "täsk/ 🙂"), ("x" * 256, "{tag}:*"), ("acme", "")],
)
def test_a_checkpoint_id_names_its_tenant_and_task(tenant_id: str, task_id: str) -> None:
    issued = checkpoint_id(tenant_id, task_id, 12)
    assert issued.startswith("ck1.")
    assert issued.endswith(".12")
    assert issued == checkpoint_prefix(tenant_id, task_id) + "12"  # what lua/check.lua appends its number to
    assert issued.isascii()
    assert " " not in issued
    assert parse_checkpoint_id(issued) == (tenant_id, task_id)


@pytest.mark.parametrize(
    "value",
    ["", "ck1", "ck1.YWNtZQ.dDE", "ck1.YWNtZQ.dDE.x", "ck2.YWNtZQ.dDE.1", "ck1.YWNtZQ.dDE.1.2", "ck1.gA.dDE.1"],
)
def test_what_is_not_a_checkpoint_id_parses_to_none(value: str) -> None:
    assert parse_checkpoint_id(value) is None


def test_a_fail_open_id_is_not_a_checkpoint_id_nor_the_other_way() -> None:
    grant = fail_open_id("t1", "s1", "gpt-4o", "research")
    assert parse_checkpoint_id(grant) is None
    assert parse_fail_open_id(checkpoint_id("acme", "t1", 1)) is None
    parsed = parse_fail_open_id(grant)
    assert parsed is not None
    assert (parsed.task_id, parsed.step_id, parsed.model) == ("t1", "s1", "gpt-4o")
    assert parse_fail_open_id(grant.replace("fo1.", "fo1.!")) is None  # fail-open ids are read strictly
