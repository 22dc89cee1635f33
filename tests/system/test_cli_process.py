"""``budgetwarden`` as a real process: what only a process shows. The exit code reaches the shell (``sys.exit`` of
``main``'s answer), stdout and stderr are the process's own, and an error is one line with no traceback. Every
command's output and errors in detail are tested in process (tests/integration/test_cli.py, test_cli_errors.py,
tests/unit/test_cli_arguments.py)."""

from __future__ import annotations

import re

from support import RunningSidecar, cli, free_port, one_error_line

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DENIED = 0, 1, 2, 3
HUGE = "99999999999999999999"  # beyond int64: the protobuf encoder raised ValueError for it, a traceback
TENANT = {"BUDGETWARDEN_TENANT": "default"}


def test_check_allows_then_denies_with_exit_3_as_a_process(sidecar: RunningSidecar) -> None:
    allowed = cli("check", "--addr", sidecar.addr, "--task", "t1", "--step", "s1", "--tokens", "100", env=TENANT)

    assert allowed.returncode == EXIT_OK, allowed.stderr
    assert allowed.stderr == ""
    head = allowed.stdout.splitlines()[0]
    assert re.fullmatch(r"ALLOW: granted 100 of 100 tokens, reservation ([0-9a-f]{32}), lease until \S+", head), head

    denied = cli("check", "--addr", sidecar.addr, "--task", "t1", "--step", "big", "--tokens", "300000", env=TENANT)

    assert denied.returncode == EXIT_DENIED, denied.stderr
    assert denied.stderr == ""
    assert denied.stdout.startswith("DENY: granted 0 of 300000 tokens\n")


def test_an_unreachable_sidecar_is_one_line_and_exit_1_as_a_process() -> None:
    addr = f"127.0.0.1:{free_port()}"

    result = cli("budget", "--addr", addr, "--timeout", "3", "--task", "t1", env=TENANT)

    assert result.returncode == EXIT_ERROR
    assert one_error_line(result).startswith(f"budgetwarden budget: error: cannot reach the sidecar at {addr}")
    assert result.stdout == ""


def test_a_real_process_prints_one_line_and_no_traceback() -> None:
    for args in (
        ["check", "--tenant", "acme", "--task", "t1", "--step", "s1", "--tokens", HUGE],
        ["usage", "export", "--since", "1h", "--redis-url", "http://foo"],
        ["approve", "ck1.x", "--add-usd", "nan"],
    ):
        result = cli(*args)  # asserts that stderr holds no traceback
        assert result.returncode == EXIT_USAGE, result.stderr
        assert one_error_line(result).startswith("budgetwarden "), result.stderr
        assert ": error: " in result.stderr
