from pathlib import Path

import pytest

from budgetwarden.domain._model import Window
from budgetwarden.domain._policy import PolicyError, default_policy, load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[2]


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    return caught.value.problems


def test_example_and_default_policies_are_valid() -> None:
    example = load_policy(ROOT / "examples" / "policy.yaml").policy
    limits = example.tenants["acme"].window_limits()
    assert [(window, limit.tokens, limit.usd_micros) for window, limit in limits] == [
        (Window.MINUTE, 200000, None),
        (Window.HOUR, 3000000, None),
        (Window.DAY, 20000000, 400_000_000),
        (Window.MONTH, None, 8_000_000_000),
    ]
    research = example.task_types["research"]
    assert (research.soft_bp, research.checkpoint_bp) == (8000, 9500)
    assert [rung.name for rung in research.degrade] == ["cheaper-model", "smaller-context", "no-tools"]
    assert example.model("gpt-4o")[0].cached_input_micros_per_mtok == 1_250_000
    assert example.model("gpt-4-turbo")[0].cached_input_micros_per_mtok == 10_000_000  # defaults to the input price
    assert example.model("unknown-llm") == (example.default_model, True)
    assert example.task_type("") == ("general", example.task_types["general"])
    assert example.task_type("research")[0] == "research"  # type: ignore[index]
    assert default_policy().policy.task_type("anything")[0] == "default"  # type: ignore[index]


def test_unknown_tenants_get_the_default_or_are_rejected() -> None:
    lenient = parse_policy("default_tenant: {time_zone: Asia/Tokyo}\n", "p").policy
    strict = parse_policy("unknown_tenants: reject\ntenants: {a: {}}\n", "p").policy
    assert lenient.tenant("nobody") == lenient.default_tenant
    assert strict.tenant("nobody") is None
    assert strict.tenant("a") is not None


def test_no_default_task_type_rejects_unknown_ones() -> None:
    policy = parse_policy("task_types: {a: {per_task: {tokens: 5}}}\n", "p").policy
    assert policy.task_type("b") is None
    assert policy.task_type("") is None
    assert policy.task_type("a") == ("a", policy.task_types["a"])


def test_version_changes_with_content() -> None:
    assert parse_policy("version: 1\n", "p").version != parse_policy("version: 1\n# note\n", "p").version


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tenants:\n  a:\n    time_zone: Mars/Olympus\n", "3: tenants.a.time_zone: unknown time zone 'Mars/Olympus'"),
        ("tenants:\n  a:\n    windows:\n      day: {tokens: -1}\n", "4: tenants.a.windows.day.tokens: Input should be"),
        ("tenants:\n  a:\n    windows:\n      week: {tokens: 1}\n", "4: tenants.a.windows.week"),
        ("task_types:\n  a:\n    per_task: {tokenz: 1}\n", "3: task_types.a.per_task.tokenz: Extra inputs"),
        ("task_types:\n  a:\n    per_step: {tokens: 1000000000000000001}\n", "3: task_types.a.per_step.tokens"),
        ("task_types:\n  a:\n    lease_seconds: 0\n", "3: task_types.a.lease_seconds"),
        ("task_types: {a: {}}\ndefault_task_type: nope\n", "2: default_task_type: 'nope' is not one of task_types (a)"),
        ("version: 2\n", "1: version: Input should be 1"),
        ("unknown_tenants: maybe\n", "1: unknown_tenants: Input should be 'default' or 'reject'"),
        ("tenants:\n  a: {}\n  a: {}\n", "3: tenants.a: duplicate key (first given on line 2)"),
        ("tenants: [\n", "not valid YAML"),
        ("", "1: the file is empty"),
        ("- 1\n- 2\n", "1: (top level): Input should be a valid dictionary"),
    ],
)
def test_errors_name_line_and_field(text: str, expected: str) -> None:
    found = problems(text)
    assert any(expected in problem for problem in found), found


def test_every_problem_is_reported_with_the_file_name() -> None:
    text = "tenants:\n  a:\n    time_zone: Nowhere/Land\n    windows:\n      day: {tokens: x}\n"
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "policies/prod.yaml")
    lines = str(caught.value).splitlines()
    assert len(lines) == 2
    assert all(line.startswith("policies/prod.yaml:") for line in lines)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")
