"""``budgetwarden serve`` refuses bad settings before it starts anything: one line naming the setting, a non-zero exit
code, no traceback. ``main(argv)`` in process: each of these fails while reading its settings, before a server, a port
or a data dir is touched (tests/system/test_serve.py runs serve as a process)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from support import run_cli


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``serve`` on an ephemeral port (should a bad setting ever be let through, it could not take a real one)."""
    return run_cli("serve", "--listen", "127.0.0.1:0", *args, env=env)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_invalid_fail_mode_flag_is_an_argument_error() -> None:
    result = serve("--fail-mode", "maybe")

    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith("budgetwarden serve: error: argument --fail-mode: invalid choice: 'maybe'"), line


@pytest.mark.parametrize(
    ("args", "env", "setting"),
    [
        ([], {"BUDGETWARDEN_CHECK_DEADLINE_MS": "0"}, "check_deadline_ms"),
        ([], {"BUDGETWARDEN_FAIL_MODE": "sometimes"}, "fail_mode"),
        (["--check-deadline-ms", "soon"], {}, "check_deadline_ms"),
        (["--shutdown-grace-seconds", "-1"], {}, "shutdown_grace_seconds"),
    ],
    ids=["env-deadline-zero", "env-fail-mode", "flag-deadline-not-int", "flag-negative-grace"],
)
def test_invalid_setting_is_one_line_without_traceback(args: list[str], env: dict[str, str], setting: str) -> None:
    result = serve(*args, env=env)

    assert result.returncode != 0
    line = one_line(result)
    assert line.startswith(f"budgetwarden serve: error: setting {setting}: "), line


@pytest.mark.parametrize(
    ("text", "setting"),
    [("fail_mode: maybe\n", "fail_mode"), ("no_such_setting: 1\n", "no_such_setting")],
    ids=["bad-value", "unknown-key"],
)
def test_invalid_config_file_setting_is_one_line(tmp_path: Path, text: str, setting: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text)

    result = serve("--config", str(config))

    assert result.returncode != 0
    line = one_line(result)
    assert line.startswith(f"budgetwarden serve: error: setting {setting}: "), line


def test_config_file_that_is_not_yaml_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("listen: [127.0.0.1\n")

    result = serve("--config", str(config))

    assert result.returncode != 0
    line = one_line(result)
    assert str(config) in line, line


# --- issue 11, item 11: a URL that is not Redis -----------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://x", "localhost:6379", "HTTPS://user:secret@host/0"])
def test_a_redis_url_that_is_not_redis_is_one_line(url: str, tmp_path: Path) -> None:
    for result in (
        serve("--redis-url", url, "--data-dir", str(tmp_path / "d")),
        serve("--data-dir", str(tmp_path / "d"), env={"BUDGETWARDEN_REDIS_URL": url}),
    ):
        line = one_line(result)
        assert result.returncode == 2, result.stderr
        assert line.startswith(
            "budgetwarden serve: error: setting redis_url: must be a redis://, rediss://, unix:// or redis+sentinel://"
        )
        assert "secret" not in line
    assert not (tmp_path / "d").exists()
