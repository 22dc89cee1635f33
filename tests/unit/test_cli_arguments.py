"""The ``budgetwarden`` command without a sidecar: ``policy validate`` and argument errors, ``main(argv)`` in this
process. Errors are one line on stderr, and nothing escapes ``main`` (which a process would print as a traceback)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from support import one_error_line
from support import run_cli as cli

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


# --- policy validate ----------------------------------------------------------------------------------------------

GOOD_POLICY = """\
version: 1
unknown_tenants: reject
tenants:
  acme:
    time_zone: Europe/Berlin
    windows:
      day: {tokens: 1000}
      month: {tokens: 20000}
default_task_type: research
task_types:
  research:
    per_task: {tokens: 500}
    per_step: {tokens: 100}
    lease_seconds: 60
  triage: {}
"""


def test_policy_validate_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD_POLICY)

    result = cli("policy", "validate", str(path))

    assert result.returncode == EXIT_OK, result.stderr
    assert result.stderr == ""
    assert re.fullmatch(
        rf"{re.escape(str(path))}: valid \(version [0-9a-f]{{12}}\): "
        r"1 tenants, 2 task types, 0 models, unknown tenants: reject",
        result.stdout.strip(),
    ), result.stdout


def test_policy_validate_the_shipped_default_policy() -> None:
    path = Path(__file__).resolve().parents[2] / "server" / "budgetwarden" / "domain" / "default_policy.yaml"

    result = cli("policy", "validate", str(path))

    assert result.returncode == EXIT_OK, result.stderr
    assert "1 task types" in result.stdout


BAD_POLICIES = {
    "unknown-time-zone": (
        "version: 1\ntenants:\n  acme:\n    time_zone: Mars/Olympus\n",
        [r"4: tenants\.acme\.time_zone: unknown time zone 'Mars/Olympus'"],
    ),
    "negative-tokens": (
        "version: 1\ntask_types:\n  research:\n    per_task: {tokens: 500}\n    per_step:\n      tokens: -3\n",
        [r"6: task_types\.research\.per_step\.tokens: .*greater than or equal to 0"],
    ),
    "duplicate-key": (
        "version: 1\ntenants:\n  acme: {}\n  other: {}\n  acme: {}\n",
        [r"5: tenants\.acme: duplicate key \(first given on line 3\)"],
    ),
    "invalid-yaml": ("version: 1\ntenants: [a\n  b: c\n", [r"3: not valid YAML: "]),
    "empty": ("", [r"1: the file is empty"]),
    "unknown-field": (
        "version: 1\ntask_types:\n  research:\n    per_stepp: {tokens: 5}\n",
        [r"4: task_types\.research\.per_stepp: Extra inputs are not permitted"],
    ),
    "several-problems": (
        "version: 2\ntenants:\n  acme:\n    windows:\n      week: {tokens: 5}\n      day: {tokens: lots}\n",
        [
            r"1: version: ",
            r"5: tenants\.acme\.windows\.week\.\[key\]: ",
            r"6: tenants\.acme\.windows\.day\.tokens: .*valid integer",
        ],
    ),
    "unknown-default-task-type": (
        "version: 1\ntask_types:\n  a: {}\ndefault_task_type: b\n",
        [r"4: default_task_type: 'b' is not one of task_types"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_POLICIES))
def test_policy_validate_a_bad_file_names_file_line_and_field(tmp_path: Path, case: str) -> None:
    text, expected = BAD_POLICIES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)

    result = cli("policy", "validate", str(path))

    assert result.returncode == EXIT_ERROR
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == len(expected), result.stderr
    for line, pattern in zip(lines, expected, strict=True):
        assert re.match(re.escape(f"{path}:") + pattern, line), f"{line!r} does not match {pattern!r}"


def test_policy_validate_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"

    result = cli("policy", "validate", str(path))

    assert result.returncode == EXIT_ERROR
    line = one_error_line(result)
    assert line.startswith(f"{path}:0: cannot read: "), line
    assert "No such file" in line


# --- bad arguments ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["check", "--step", "s1", "--tokens", "5"], "the following arguments are required: --task"),
        (["check", "--task", "t1", "--step", "s1", "--tokens", "five"], "argument --tokens: invalid int value: 'five'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: command"),
        (["policy"], "the following arguments are required: policy_command"),
        (["policy", "validate"], "the following arguments are required: file"),
        (["report", "--task", "t1", "--step", "s1", "--outcome", "exploded"], "argument --outcome: invalid choice"),
        (["check", "--task", "t1", "--step", "s1", "--tokens", "-5"], "argument --tokens: must be from 0 to"),
        (["check", "--task", "t1", "--step", "s1", "--output-tokens", "-1"], "argument --output-tokens: must be"),
        (["check", "--task", "t1", "--step", "s1", "--lease", "0"], "argument --lease: must be from 1 to"),
        (["check", "--task", "t1", "--step", "s1", "--ceiling", "0"], "argument --ceiling: must be from 1 to"),
        (["report", "--task", "t1", "--step", "s1", "--input-tokens", "-1"], "argument --input-tokens: must be"),
    ],
    ids=[
        "missing-task",
        "non-integer-tokens",
        "unknown-subcommand",
        "no-subcommand",
        "no-policy-command",
        "no-policy-file",
        "bad-outcome",
        "negative-tokens",
        "negative-output",
        "zero-lease",
        "zero-ceiling",
        "negative-report",
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args: list[str], expected: str) -> None:
    result = cli(*args, "--addr", "127.0.0.1:1") if args[:1] in (["check"], ["report"]) else cli(*args)

    assert result.returncode == EXIT_USAGE, result.stderr
    line = one_error_line(result)
    assert line.startswith("budgetwarden"), line
    assert expected in line, line
    assert result.stdout == ""
