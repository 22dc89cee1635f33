"""The ``budgetwarden`` command, ``main(argv)`` in this process, against a real sidecar (and a real Redis-compatible
server) over a real socket.

Every invocation is checked for the CLI's promise: errors are one line on stderr, and nothing escapes ``main`` (which a
process would print as a traceback). tests/system/test_cli_process.py runs the same promises as real processes.
"""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest

from budgetwarden_client import BudgetClient, pb

import support
from support import TEST_RPC_TIMEOUT_S, free_port, one_error_line

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DENIED = 0, 1, 2, 3
RESERVATION_ID = re.compile(r"^[0-9a-f]{32}$")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``budgetwarden`` in process, for the tenant ``default`` unless a test says otherwise (client commands take the
    tenant from --tenant or BUDGETWARDEN_TENANT, never silently)."""
    return support.run_cli(*args, env={"BUDGETWARDEN_TENANT": "default", **(env or {})})


def table_row(stdout: str, scope: str) -> list[str]:
    """The cells of a scope table's row (``scope limit used reserved remaining [resets at]``)."""
    lines = stdout.splitlines()
    headers = [i for i, line in enumerate(lines) if line.split()[:2] == ["scope", "limit"]]
    assert len(headers) == 1, stdout
    for line in lines[headers[0] :]:
        cells = line.split()
        if cells and cells[0] == scope:
            return cells
    raise AssertionError(f"no {scope!r} row in:\n{stdout}")


def task_scope(addr: str, task: str, tenant: str = "default") -> pb.ScopeState:
    with BudgetClient(addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        answer = client.get_budget(tenant_id=tenant, task_id=task)
    (found,) = [s for s in answer.scopes if s.name == "task"]
    return found


def as_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(result.stdout)
    return data


@pytest.fixture
def addr(sidecar: Any) -> str:
    return str(sidecar.addr)


# --- check --------------------------------------------------------------------------------------------------------


def test_check_allows_and_prints_a_readable_answer(addr: str) -> None:
    result = cli("check", "--addr", addr, "--task", "t1", "--step", "s1", "--tokens", "100")

    assert result.returncode == EXIT_OK, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    head = re.fullmatch(r"ALLOW: granted 100 of 100 tokens, reservation ([0-9a-f]{32}), lease until \S+", lines[0])
    assert head is not None, lines[0]
    assert lines[1] == "reason: WITHIN_BUDGET: allowed 100 tokens"
    assert "note: this step was checked before" not in result.stdout
    assert table_row(result.stdout, "scope") == ["scope", "limit", "used", "reserved", "remaining", "resets", "at"]
    assert table_row(result.stdout, "task") == ["task", "1000000", "0", "100", "999900", "-"]
    assert table_row(result.stdout, "step")[:2] == ["step", "200000"]
    assert table_row(result.stdout, "tenant.day")[:5] == ["tenant.day", "50000000", "0", "100", "49999900"]
    # The CLI really reserved on the sidecar.
    assert task_scope(addr, "t1").reserved_tokens == 100


def test_check_json_output(addr: str) -> None:
    result = cli(
        "check", "--addr", addr, "--json", "--tenant", "acme", "--task", "t1", "--step", "s1",
        "--tokens", "100", "--input-tokens", "20", "--output-tokens", "30",
    )  # fmt: skip

    assert result.returncode == EXIT_OK, result.stderr
    answer = as_json(result)
    assert answer["decision"] == "DECISION_ALLOW"
    assert answer["reason"] == "REASON_WITHIN_BUDGET"
    assert int(answer["requested_tokens"]) == 150
    assert int(answer["granted_tokens"]) == 150
    assert RESERVATION_ID.match(answer["reservation_id"])
    assert "replayed" not in answer
    scopes = {scope["name"]: scope for scope in answer["scopes"]}
    assert int(scopes["task"]["reserved_tokens"]) == 150
    assert int(scopes["task"]["limit_tokens"]) == 1_000_000
    assert scopes["tenant.month"]["window"] == "WINDOW_MONTH"
    assert task_scope(addr, "t1", tenant="acme").reserved_tokens == 150


def test_check_above_the_step_cap_is_denied_with_exit_3(addr: str) -> None:
    result = cli("check", "--addr", addr, "--task", "t1", "--step", "big", "--tokens", "300000")

    assert result.returncode == EXIT_DENIED, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("DENY: granted 0 of 300000 tokens\n")
    assert "reservation" not in result.stdout.splitlines()[0]
    assert "reason: STEP_CAP_EXCEEDED: " in result.stdout
    assert "200000" in result.stdout
    assert "bound by: step" in result.stdout
    assert task_scope(addr, "t1").reserved_tokens == 0


def test_check_deny_with_json_still_exits_3(addr: str) -> None:
    result = cli("check", "--addr", addr, "--json", "--task", "t1", "--step", "big", "--tokens", "200001")

    assert result.returncode == EXIT_DENIED, result.stderr
    answer = as_json(result)
    assert answer["decision"] == "DECISION_DENY"
    assert answer["reason"] == "REASON_STEP_CAP_EXCEEDED"
    assert answer["binding_scope"] == "step"
    assert int(answer.get("granted_tokens", 0)) == 0


def test_check_exactly_at_the_step_cap_is_allowed(addr: str) -> None:
    result = cli("check", "--addr", addr, "--task", "t1", "--step", "s1", "--tokens", "200000")

    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert result.stdout.startswith("ALLOW: granted 200000 of 200000 tokens")


def test_check_with_an_explicit_ceiling_that_is_too_small_is_denied(addr: str) -> None:
    result = cli(
        "check", "--addr", addr, "--json", "--task", "t1", "--step", "s1", "--tokens", "100", "--ceiling", "50"
    )

    assert result.returncode == EXIT_DENIED, result.stderr
    answer = as_json(result)
    assert answer["decision"] == "DECISION_DENY"
    assert answer["reason"] == "REASON_TASK_BUDGET_EXHAUSTED"
    assert answer["binding_scope"] == "task"


def test_replayed_check_returns_the_same_reservation_and_reserves_once(addr: str) -> None:
    first = cli("check", "--addr", addr, "--json", "--task", "t1", "--step", "s1", "--tokens", "100")
    again = cli("check", "--addr", addr, "--task", "t1", "--step", "s1", "--tokens", "100")
    again_json = cli("check", "--addr", addr, "--json", "--task", "t1", "--step", "s1", "--tokens", "100")

    assert (first.returncode, again.returncode, again_json.returncode) == (EXIT_OK, EXIT_OK, EXIT_OK)
    reservation = as_json(first)["reservation_id"]
    assert f"reservation {reservation}" in again.stdout.splitlines()[0]
    assert "note: this step was checked before; this is its reservation" in again.stdout
    replay = as_json(again_json)
    assert replay["replayed"] is True
    assert replay["reservation_id"] == reservation
    assert int(replay["granted_tokens"]) == 100
    assert task_scope(addr, "t1").reserved_tokens == 100


def test_check_labels_are_sent(addr: str) -> None:
    ok = cli("check", "--addr", addr, "--task", "t1", "--step", "s1", "--tokens", "5",
             "--label", "team=search", "--label", "expr=a=b", "--label", "empty=")  # fmt: skip
    assert ok.returncode == EXIT_OK, ok.stderr

    # A label the server refuses proves labels travel to the sidecar: its error names the label field.
    too_long = cli("check", "--addr", addr, "--task", "t1", "--step", "s2", "--tokens", "5",
                   "--label", "team=" + "x" * 300)  # fmt: skip
    assert too_long.returncode == EXIT_ERROR
    line = one_error_line(too_long)
    assert line.startswith("budgetwarden check: error: INVALID_ARGUMENT: labels['team']"), line


@pytest.mark.parametrize("label", ["novalue", "=value"])
def test_check_malformed_label_is_one_line_and_exit_1(addr: str, label: str) -> None:
    result = cli("check", "--addr", addr, "--task", "t1", "--step", "s1", "--tokens", "5", "--label", label)

    assert result.returncode == EXIT_ERROR
    line = one_error_line(result)
    assert line == f"budgetwarden check: error: --label {label!r}: expected KEY=VALUE"
    assert result.stdout == ""
    assert task_scope(addr, "t1").reserved_tokens == 0


# --- report -------------------------------------------------------------------------------------------------------


def test_report_by_task_and_step_then_duplicate(addr: str) -> None:
    assert cli("check", "--addr", addr, "--task", "t1", "--step", "s1", "--tokens", "100").returncode == EXIT_OK

    args = ("report", "--addr", addr, "--task", "t1", "--step", "s1", "--input-tokens", "50", "--output-tokens", "10")
    first = cli(*args)
    second = cli(*args)

    assert first.returncode == EXIT_OK, first.stderr
    assert first.stdout.strip() == "APPLIED: charged 60 tokens, refunded 40, overage 0; task has 999940 tokens left"
    assert second.returncode == EXIT_OK, second.stderr
    assert second.stdout.startswith("DUPLICATE: charged 0 tokens")
    scope = task_scope(addr, "t1")
    assert (scope.used_tokens, scope.reserved_tokens) == (60, 0)


def test_report_by_reservation_json_then_duplicate(addr: str) -> None:
    checked = cli("check", "--addr", addr, "--json", "--task", "t1", "--step", "s1", "--tokens", "100")
    reservation = as_json(checked)["reservation_id"]

    args = ("report", "--addr", addr, "--json", "--reservation", reservation, "--input-tokens", "30")
    first = cli(*args)
    second = cli(*args)

    assert first.returncode == EXIT_OK, first.stderr
    applied = as_json(first)
    assert applied["status"] == "REPORT_STATUS_APPLIED"
    assert applied["reservation_id"] == reservation
    assert int(applied["charged_tokens"]) == 30
    assert int(applied["refunded_tokens"]) == 70
    assert second.returncode == EXIT_OK, second.stderr
    assert as_json(second)["status"] == "REPORT_STATUS_DUPLICATE"
    assert task_scope(addr, "t1").used_tokens == 30


def test_report_without_a_target_is_one_line_and_exit_1(addr: str) -> None:
    result = cli("report", "--addr", addr, "--task", "t1", "--input-tokens", "5")

    assert result.returncode == EXIT_ERROR
    assert one_error_line(result) == "budgetwarden report: error: give --reservation, or --task and --step"


def test_report_with_a_bad_reservation_id_names_the_field(addr: str) -> None:
    result = cli("report", "--addr", addr, "--reservation", "not-an-id", "--input-tokens", "5")

    assert result.returncode == EXIT_ERROR
    line = one_error_line(result)
    assert line.startswith("budgetwarden report: error: INVALID_ARGUMENT: records[0].reservation_id: "), line


# --- release ------------------------------------------------------------------------------------------------------


def test_release_then_already_released(addr: str) -> None:
    assert cli("check", "--addr", addr, "--task", "t1", "--step", "s1", "--tokens", "100").returncode == EXIT_OK
    assert task_scope(addr, "t1").reserved_tokens == 100

    first = cli("release", "--addr", addr, "--task", "t1", "--step", "s1")
    second = cli("release", "--addr", addr, "--task", "t1", "--step", "s1")

    assert first.returncode == EXIT_OK, first.stderr
    assert re.fullmatch(r"RELEASED: 100 tokens handed back \(reservation [0-9a-f]{32}\)", first.stdout.strip())
    assert second.returncode == EXIT_OK, second.stderr
    assert second.stdout.startswith("ALREADY_RELEASED: 0 tokens handed back")
    assert task_scope(addr, "t1").reserved_tokens == 0


def test_release_by_reservation_json(addr: str) -> None:
    reservation = as_json(cli("check", "--addr", addr, "--json", "--task", "t1", "--step", "s1", "--tokens", "70"))[
        "reservation_id"
    ]

    result = cli("release", "--addr", addr, "--json", "--reservation", reservation)

    assert result.returncode == EXIT_OK, result.stderr
    answer = as_json(result)
    assert answer["status"] == "RELEASE_STATUS_RELEASED"
    assert answer["reservation_id"] == reservation
    assert int(answer["released_tokens"]) == 70


def test_release_of_an_unknown_step_is_not_found(addr: str) -> None:
    result = cli("release", "--addr", addr, "--task", "t1", "--step", "never-checked")

    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.startswith("NOT_FOUND: 0 tokens handed back")


def test_release_without_a_target_is_one_line_and_exit_1(addr: str) -> None:
    result = cli("release", "--addr", addr, "--step", "s1")

    assert result.returncode == EXIT_ERROR
    assert one_error_line(result) == "budgetwarden release: error: give --reservation, or --task and --step"


# --- budget -------------------------------------------------------------------------------------------------------


def test_budget_of_a_task_as_a_table(addr: str) -> None:
    # The sidecar's clock stands still (behind the wall clock the CLI stamps its report with): all four CLI processes
    # meet one tenant.minute window, however long they take.
    assert cli("check", "--addr", addr, "--task", "t1", "--step", "s1", "--tokens", "100").returncode == EXIT_OK
    assert cli("check", "--addr", addr, "--task", "t1", "--step", "s2", "--tokens", "20").returncode == EXIT_OK
    assert cli("report", "--addr", addr, "--task", "t1", "--step", "s1", "--input-tokens", "80").returncode == EXIT_OK

    result = cli("budget", "--addr", addr, "--task", "t1")

    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.splitlines()[0] == "task t1: task type default, 1 live reservations"
    assert table_row(result.stdout, "task") == ["task", "1000000", "80", "20", "999900", "-"]
    assert table_row(result.stdout, "tenant.minute")[:5] == ["tenant.minute", "2000000", "80", "20", "1999900"]


def test_budget_json(addr: str) -> None:
    assert cli("check", "--addr", addr, "--task", "t1", "--step", "s1", "--tokens", "100").returncode == EXIT_OK

    result = cli("budget", "--addr", addr, "--json", "--task", "t1")

    assert result.returncode == EXIT_OK, result.stderr
    answer = as_json(result)
    assert answer["task_known"] is True
    assert answer["task_type"] == "default"
    assert int(answer["active_reservations"]) == 1
    scopes = {scope["name"]: scope for scope in answer["scopes"]}
    assert set(scopes) == {"task", "tenant.minute", "tenant.day", "tenant.month"}
    assert int(scopes["task"]["reserved_tokens"]) == 100


def test_budget_of_an_unknown_task_and_of_the_tenant_only(addr: str) -> None:
    unknown = cli("budget", "--addr", addr, "--task", "nobody")
    tenant_only = cli("budget", "--addr", addr)

    assert unknown.returncode == EXIT_OK, unknown.stderr
    assert unknown.stdout.splitlines()[0] == "task nobody: not checked yet"
    assert tenant_only.returncode == EXIT_OK, tenant_only.stderr
    assert tenant_only.stdout.splitlines()[0].split()[0] == "scope"
    assert not any(line.split()[:1] == ["task"] for line in tenant_only.stdout.splitlines())
    assert table_row(tenant_only.stdout, "tenant.day")[:3] == ["tenant.day", "50000000", "0"]


def test_client_commands_use_budgetwarden_addr_from_the_environment(addr: str) -> None:
    result = cli("budget", "--task", "t1", env={"BUDGETWARDEN_ADDR": addr})

    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.startswith("task t1: not checked yet")


# --- unreachable server, server-side validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["check", "--task", "t1", "--step", "s1", "--tokens", "5"],
        ["report", "--task", "t1", "--step", "s1", "--input-tokens", "5"],
        ["release", "--task", "t1", "--step", "s1"],
        ["budget", "--task", "t1"],
    ],
    ids=lambda command: command[0],
)
def test_unreachable_server_is_one_line_and_exit_1(command: list[str]) -> None:
    addr = f"127.0.0.1:{free_port()}"

    result = cli(command[0], "--addr", addr, "--timeout", "3", *command[1:])

    assert result.returncode == EXIT_ERROR
    line = one_error_line(result)
    assert line.startswith(f"budgetwarden {command[0]}: error: cannot reach the sidecar at {addr}"), line
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (
            ["check", "--task", "t1", "--step", "s1", "--tokens", "6" + "0" * 8, "--input-tokens", "6" + "0" * 8],
            "estimated_input_tokens",
        ),
        (["check", "--task", "", "--step", "s1", "--tokens", "5"], "task_id"),
        (["check", "--task", "t1", "--step", "", "--tokens", "5"], "step_id"),
        (["check", "--tenant", "", "--task", "t1", "--step", "s1"], "tenant_id"),
        (["check", "--task", "t1", "--step", "s1", "--lease", "86401"], "lease_seconds"),
        (
            ["report", "--task", "t1", "--step", "s1", "--input-tokens", "5", "--cached-input-tokens", "6"],
            "records[0].cached_input_tokens",
        ),
        (["release", "--reservation", "XYZ"], "reservation_id"),
        (["budget", "--tenant", ""], "tenant_id"),
    ],
    ids=[
        "tokens-over-the-field-bound",
        "empty-task",
        "empty-step",
        "empty-tenant",
        "lease-over-the-sidecar-maximum",
        "cached-over-input",
        "bad-reservation",
        "budget-empty-tenant",
    ],
)
def test_server_side_invalid_argument_is_one_line_naming_the_field(addr: str, args: list[str], field: str) -> None:
    result = cli(args[0], "--addr", addr, *args[1:])

    assert result.returncode == EXIT_ERROR, result.stdout
    line = one_error_line(result)
    assert line.startswith(f"budgetwarden {args[0]}: error: INVALID_ARGUMENT: {field}: "), line
    assert result.stdout == ""
    # Nothing was reserved by a rejected request.
    assert task_scope(addr, "t1").reserved_tokens == 0
