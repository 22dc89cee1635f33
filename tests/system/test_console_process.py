"""``budgetwarden control-plane --console-listen`` as a real process: the console answers beside the admin API, and
SIGTERM still stops the whole process cleanly (uvicorn runs on the control plane's loop and leaves the signals to it);
no token reaches the log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from support import free_port, wait_for_exit
from support_admin import TWO_TENANTS_POLICY, TokensFile

pytestmark = pytest.mark.slow

READY_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 30.0


def console_answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/login", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_control_plane_serves_the_console_and_stops_on_sigterm(tmp_path: Path, redis_url: str) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(TWO_TENANTS_POLICY)
    tokens = TokensFile(tmp_path / "tokens.json")
    alice = tokens.add("alice", "approver", ["acme"])
    console = f"127.0.0.1:{free_port()}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("BUDGETWARDEN_")}
    log = tmp_path / "control-plane.log"
    command = [
        sys.executable, "-m", "budgetwarden", "control-plane", "--redis-url", redis_url,
        "--admin-listen", f"127.0.0.1:{free_port()}", "--admin-tokens-file", str(tokens.path),
        "--policy-file", str(policy), "--console-listen", console, "--log-format", "text",
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not console_answers(f"http://{console}"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the console did not answer"
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://{console}", timeout=30) as browser:
            answer = browser.post("/login", data={"token": alice}, follow_redirects=True)
            assert answer.status_code == 200
            assert "alice" in answer.text
        proc.send_signal(signal.SIGTERM)
        assert wait_for_exit(proc, EXIT_TIMEOUT_S, log.read_text) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(EXIT_TIMEOUT_S)
    assert alice not in log.read_text()


@pytest.mark.parametrize(
    ("console", "named"),
    [("no-port", "is not host:port"), ("127.0.0.1:99999", "is not host:port"), ("0.0.0.0:{}", "admin_tokens_file")],
)
def test_a_console_listener_that_cannot_serve_is_refused_in_one_line(
    tmp_path: Path, redis_url: str, console: str, named: str
) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("BUDGETWARDEN_")}
    command = [
        sys.executable, "-m", "budgetwarden", "control-plane", "--redis-url", redis_url,
        "--admin-listen", f"127.0.0.1:{free_port()}", "--console-listen", console.format(free_port()),
        "--log-format", "text",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 1, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "error" in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("budgetwarden control-plane: error: ")
    assert named in lines[0]
    assert "Traceback" not in result.stderr
