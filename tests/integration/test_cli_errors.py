"""The CLI's errors: one line that names the flag or the thing that failed, tells the truth, and gives the way out.

Calls ``main(argv)`` in process (stderr captured) against real sidecars; that a real process prints no traceback is
tests/system/test_cli_process.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from budgetwarden.cli import MAX_TOOL_CALLS as CLI_MAX_TOOL_CALLS
from budgetwarden.cli import main
from budgetwarden.transport import _validation
from budgetwarden_client import BudgetClient, pb

from support import BlackHole, RunningSidecar, free_port

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
HUGE = "99999999999999999999"  # beyond int64: the protobuf encoder raised ValueError for it, a traceback


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BUDGETWARDEN_TENANT", "BUDGETWARDEN_ADDR", "BUDGETWARDEN_ADMIN_ADDR", "BUDGETWARDEN_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(argv)``'s exit code (argparse's exit included), stdout, and its one line of stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) <= 1, err
    return code, out, lines[0] if lines else ""


def task_scope(addr: str, tenant: str, task: str = "t1") -> pb.ScopeState:
    with BudgetClient(addr, timeout=30) as client:
        answer = client.get_budget(tenant_id=tenant, task_id=task)
    return next(s for s in answer.scopes if s.name == "task")


# --- item 15: every integer (and number) option is range-checked by argparse, one line naming the flag ---------------

UNREACHABLE = ["--addr", "127.0.0.1:1"]
CHECK = ["check", *UNREACHABLE, "--tenant", "acme", "--task", "t1", "--step", "s1"]
REPORT = ["report", *UNREACHABLE, "--tenant", "acme", "--task", "t1", "--step", "s1"]
EXPLAIN = ["policy", "explain", "--tenant", "acme"]
APPROVE = ["approve", "ck1.x", "--admin-addr", "127.0.0.1:1"]
OPTIONS = [
    (CHECK, "--tokens"),
    (CHECK, "--input-tokens"),
    (CHECK, "--output-tokens"),
    (CHECK, "--tool-calls"),
    (CHECK, "--lease"),
    (CHECK, "--ceiling"),
    (CHECK, "--timeout"),
    (REPORT, "--input-tokens"),
    (REPORT, "--output-tokens"),
    (REPORT, "--cached-input-tokens"),
    (REPORT, "--tool-calls"),
    (["release", *UNREACHABLE, "--tenant", "acme", "--task", "t1", "--step", "s1"], "--timeout"),
    (["budget", *UNREACHABLE, "--tenant", "acme"], "--timeout"),
    ([*EXPLAIN, "--tokens", "5"], "--output-tokens"),
    ([*EXPLAIN, "--tokens", "5"], "--tool-calls"),
    ([*EXPLAIN, "--tokens", "5"], "--used"),
    ([*EXPLAIN, "--tokens", "5"], "--used-usd"),
    ([*EXPLAIN, "--tokens", "5"], "--window-used"),
    (EXPLAIN, "--tokens"),
    (APPROVE, "--add"),
    (APPROVE, "--add-usd"),
    (APPROVE, "--timeout"),
    (["deny", "ck1.x", "--admin-addr", "127.0.0.1:1"], "--timeout"),
]
NUMBER_FLAGS = {"--timeout", "--used-usd", "--add-usd"}


@pytest.mark.parametrize(("argv", "flag"), OPTIONS, ids=[f"{argv[0]}-{argv[1]}{flag}" for argv, flag in OPTIONS])
@pytest.mark.parametrize("value", [HUGE, "-1", "-99999999999999999999"])
def test_out_of_range_option_is_one_line_naming_the_flag(
    argv: list[str], flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, line = run([*argv, flag, value], capsys)

    assert code == EXIT_USAGE, line
    assert out == ""
    prog = " ".join(argv[:2]) if argv[0] == "policy" else argv[0]
    assert line.startswith(f"budgetwarden {prog}: error: argument {flag}: must be "), line
    assert f"(got {value})" in line


@pytest.mark.parametrize("flag", sorted(NUMBER_FLAGS))
@pytest.mark.parametrize("value", ["nan", "inf", "1e300"])
def test_numbers_that_are_not_finite_or_too_large_are_one_line(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = {"--timeout": CHECK, "--used-usd": [*EXPLAIN, "--tokens", "5"], "--add-usd": APPROVE}[flag]

    code, _, line = run([*argv, flag, value], capsys)

    assert code == EXIT_USAGE, line
    assert f"argument {flag}: must be a number " in line


def test_the_cli_bounds_are_the_sidecars() -> None:
    assert CLI_MAX_TOOL_CALLS == _validation.MAX_TOOL_CALLS


def test_the_largest_values_in_range_still_reach_the_sidecar(
    sidecar: RunningSidecar, capsys: pytest.CaptureFixture[str]
) -> None:
    # In range for the flag; the sidecar judges the sum (two fields of 10^9 are more than one field may hold).
    argv = ["check", "--addr", sidecar.addr, "--tenant", "acme", "--task", "t1", "--step", "s1"]
    code, _, line = run([*argv, "--tokens", "1000000000", "--input-tokens", "1000000000"], capsys)

    assert code == EXIT_ERROR
    assert line.startswith("budgetwarden check: error: INVALID_ARGUMENT: estimated_input_tokens: must be at most"), line


def test_usage_export_with_a_url_that_is_not_redis_names_the_flag_and_the_schemes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, line = run(["usage", "export", "--since", "1h", "--redis-url", "http://user:secret@foo"], capsys)

    assert code == EXIT_USAGE
    assert out == ""
    assert line == (
        "budgetwarden usage export: error: --redis-url (or BUDGETWARDEN_REDIS_URL): 'http' is not a Redis URL; "
        "expected one starting with redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://"
    )
    assert "secret" not in line


def test_usage_summary_with_a_malformed_redis_url_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["usage", "summary", "--tenant", "acme", "--redis-url", "redis://localhost:port"]

    code, _, line = run(argv, capsys)

    assert code == EXIT_USAGE
    assert line.startswith("budgetwarden usage summary: error: --redis-url (or BUDGETWARDEN_REDIS_URL): "), line


def test_serve_with_tls_settings_that_do_not_go_together_is_one_line_naming_the_setting(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not used: the settings are refused first")
    code, _, line = run(["serve", "--redis-url", "redis://127.0.0.1:1/0", "--redis-tls-ca-file", str(ca)], capsys)

    assert code == EXIT_USAGE
    assert line == "budgetwarden serve: error: setting redis_tls_ca_file: needs a rediss:// redis_url (TLS)"


# --- item 18: the tenant comes from --tenant or BUDGETWARDEN_TENANT, never silently from a default ----------------

TENANT_COMMANDS = [
    ["check", "--task", "t1", "--step", "s1", "--tokens", "5"],
    ["report", "--task", "t1", "--step", "s1", "--input-tokens", "5"],
    ["release", "--task", "t1", "--step", "s1"],
    ["budget"],
    ["policy", "explain", "--tokens", "5"],
    ["usage", "summary", "--redis-url", "redis://127.0.0.1:1"],
]


@pytest.mark.parametrize("argv", TENANT_COMMANDS, ids=lambda argv: "-".join(argv[:2]))
def test_a_command_without_a_tenant_is_refused_naming_the_flag_and_the_variable(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, line = run([*argv, "--addr", "127.0.0.1:1"] if argv[0] not in ("policy", "usage") else argv, capsys)

    assert code == EXIT_USAGE
    assert out == ""
    prog = " ".join(argv[:2]) if argv[0] in ("policy", "usage") else argv[0]
    assert line.startswith(f"budgetwarden {prog}: error: give --tenant, or set BUDGETWARDEN_TENANT"), line


def test_a_report_without_a_tenant_charges_nobody_else(
    sidecar: RunningSidecar, capsys: pytest.CaptureFixture[str]
) -> None:
    at = ["--addr", sidecar.addr]
    assert run(["check", *at, "--tenant", "acme", "--task", "t1", "--step", "s1", "--tokens", "100"], capsys)[0] == 0

    code, _, line = run(["report", *at, "--task", "t1", "--step", "s1", "--input-tokens", "80"], capsys)

    assert code == EXIT_USAGE, line
    assert "--tenant" in line
    acme = task_scope(sidecar.addr, "acme")
    assert (acme.used_tokens, acme.reserved_tokens) == (0, 100)
    assert task_scope(sidecar.addr, "default").used_tokens == 0  # not charged to another tenant as UNRESERVED


def test_the_tenant_comes_from_budgetwarden_tenant(
    sidecar: RunningSidecar, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUDGETWARDEN_TENANT", "acme")
    at = ["--addr", sidecar.addr]

    assert run(["check", *at, "--task", "t1", "--step", "s1", "--tokens", "100"], capsys)[0] == EXIT_OK
    code, out, line = run(["report", *at, "--task", "t1", "--step", "s1", "--input-tokens", "80"], capsys)

    assert code == EXIT_OK, line
    assert out.startswith("APPLIED: charged 80 tokens, refunded 20"), out
    assert task_scope(sidecar.addr, "acme").used_tokens == 80
    # --tenant still wins over the variable.
    assert run(["check", *at, "--tenant", "other", "--task", "t1", "--step", "s1", "--tokens", "7"], capsys)[0] == 0
    assert task_scope(sidecar.addr, "other").reserved_tokens == 7


# --- item 5 (CLI side): a report must say what the step spent ---------------------------------------------------


def test_a_report_with_no_usage_is_refused_and_the_true_report_still_applies(
    sidecar: RunningSidecar, capsys: pytest.CaptureFixture[str]
) -> None:
    at = ["--addr", sidecar.addr, "--tenant", "acme"]
    assert run(["check", *at, "--task", "demo", "--step", "r1", "--tokens", "1000"], capsys)[0] == EXIT_OK

    code, out, line = run(["report", *at, "--task", "demo", "--step", "r1"], capsys)

    assert code == EXIT_USAGE
    assert out == ""
    assert line.startswith(
        "budgetwarden report: error: give what the step spent: --input-tokens, --output-tokens, "
        "--cached-input-tokens or --tool-calls"
    ), line
    assert "--outcome failed or cancelled" in line
    assert "budgetwarden release" in line
    assert task_scope(sidecar.addr, "acme", "demo").reserved_tokens == 1000  # nothing was sent
    code, out, _ = run(["report", *at, "--task", "demo", "--step", "r1", "--input-tokens", "700"], capsys)
    assert code == EXIT_OK
    assert out.startswith("APPLIED: charged 700 tokens, refunded 300")


def test_a_failed_step_may_be_reported_without_usage(
    sidecar: RunningSidecar, capsys: pytest.CaptureFixture[str]
) -> None:
    at = ["--addr", sidecar.addr, "--tenant", "acme"]
    assert run(["check", *at, "--task", "demo", "--step", "r1", "--tokens", "1000"], capsys)[0] == EXIT_OK

    code, out, line = run(["report", *at, "--task", "demo", "--step", "r1", "--outcome", "failed"], capsys)

    assert code == EXIT_OK, line
    assert out.startswith("APPLIED: charged 0 tokens, refunded 1000"), out


# --- item 17: errors name the right thing ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["approve", "ck1.x", "--add", "5"], ["deny", "ck1.x"]], ids=lambda c: c[0])
def test_no_admin_listener_names_the_admin_address_and_admin_listen(
    command: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    admin_addr, budget_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("BUDGETWARDEN_ADMIN_ADDR", admin_addr)
    monkeypatch.setenv("BUDGETWARDEN_ADDR", budget_addr)

    code, _, line = run([*command, "--timeout", "20"], capsys)

    assert code == EXIT_ERROR
    assert line.startswith(f"budgetwarden {command[0]}: error: cannot reach the admin listener at {admin_addr}: "), line
    assert budget_addr not in line
    assert "--admin-listen" in line
    assert "--admin-addr" in line


def test_an_unreachable_sidecar_says_so_and_where_to_point(capsys: pytest.CaptureFixture[str]) -> None:
    addr = f"127.0.0.1:{free_port()}"

    code, _, line = run(["budget", "--addr", addr, "--tenant", "acme", "--timeout", "20"], capsys)

    assert code == EXIT_ERROR
    assert line.startswith(f"budgetwarden budget: error: cannot reach the sidecar at {addr}: "), line
    assert "--addr" in line


@pytest.fixture
def storeless(start_sidecar: Callable[..., RunningSidecar]) -> RunningSidecar:
    """A sidecar whose Redis is down: nothing listens on its port."""
    return start_sidecar(redis_url=f"redis://127.0.0.1:{free_port()}/0")


@pytest.mark.parametrize(
    "command",
    [
        ["budget", "--task", "t1"],
        ["release", "--task", "t1", "--step", "s1"],
        ["report", "--task", "t1", "--step", "s1", "--input-tokens", "5"],
    ],
    ids=lambda c: c[0],
)
def test_a_sidecar_whose_store_is_down_is_not_called_unreachable(
    storeless: RunningSidecar, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, line = run([*command, "--addr", storeless.addr, "--tenant", "acme", "--timeout", "30"], capsys)

    assert code == EXIT_ERROR
    assert line.startswith(
        f"budgetwarden {command[0]}: error: the sidecar at {storeless.addr} answered, but its budget store (Redis) "
        "is unavailable: budget store unavailable: "
    ), line
    assert "cannot reach" not in line
    assert line.endswith("check the Redis the sidecar uses (its --redis-url, or its embedded server) and try again")
    if command[0] == "report":
        assert "the records may have been applied in part or in whole" in line
        assert "some records may be applied" not in line


def test_a_sidecar_that_does_not_answer_in_time_is_named_with_the_timeout(
    black_hole: BlackHole, capsys: pytest.CaptureFixture[str]
) -> None:
    addr = f"127.0.0.1:{black_hole.port}"  # accepts the connection, never answers

    code, _, line = run(["budget", "--addr", addr, "--tenant", "acme", "--timeout", "2"], capsys)

    assert code == EXIT_ERROR
    assert line.startswith(f"budgetwarden budget: error: no answer from {addr} within 2 s: "), line
    assert line.endswith("try again, or give a longer --timeout")
