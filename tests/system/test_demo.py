"""``make demo`` as a user runs it (not on a terminal, so its output is a plain line per row): the demo agent walks its
task through ALLOW, DEGRADE, CHECKPOINT, the operator's approval, ALLOW and DENY, exits 0, and leaves nothing running.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEMO_RECIPE = "$(BIN)/python examples/demo_agent.py"
# The demo starts a sidecar and a model server and runs five steps: seconds; the bound is for a very busy machine.
DEMO_TIMEOUT = 240
ROW = re.compile(r"^(?P<step>\d+/\d+)\s+(?P<decision>[A-Z_]+)\s+(?P<rest>.*)$")
ANSI_ESCAPE = "\x1b["


def make_target_recipe(target: str) -> list[str]:
    """The recipe lines of ``target`` in the Makefile."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"{target}:")), None)
    assert start is not None, f"no {target} target in the Makefile"
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def listening(addr: str) -> bool:
    host, port = addr.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, int(port))) == 0


@pytest.fixture(scope="module")
def demo() -> subprocess.CompletedProcess[str]:
    """``make demo`` with this interpreter's virtualenv as ``BIN``; ``-o`` keeps make from reinstalling it."""
    assert make_target_recipe("demo") == [DEMO_RECIPE]
    command = [
        "make",
        "--no-print-directory",
        "-o",
        ".venv/.dev-installed",
        "demo",
        f"BIN={Path(sys.executable).parent}",
    ]
    env = {key: value for key, value in os.environ.items() if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    # A stray setting must not reach the demo's sidecar: it serves the embedded default whatever the shell says.
    env["BUDGETWARDEN_REDIS_URL"] = "redis://127.0.0.1:1"
    with subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=DEMO_TIMEOUT)
        except subprocess.TimeoutExpired:
            # SIGTERM to make, the demo and its sidecar, which all stop cleanly on it (a SIGKILL would leave the
            # sidecar and its embedded server running).
            os.killpg(process.pid, signal.SIGTERM)
            stdout, stderr = process.communicate(timeout=60)
            pytest.fail(f"make demo did not finish within {DEMO_TIMEOUT} s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def rows(output: str) -> list[re.Match[str]]:
    return [match for line in output.splitlines() if (match := ROW.match(line))]


def test_make_demo_runs_the_demo_agent() -> None:
    assert make_target_recipe("demo") == [DEMO_RECIPE]
    makefile = (ROOT / "Makefile").read_text()
    assert "demo: $(DEV_STAMP)" in makefile  # the demo needs openai, rich and scripted_openai: the dev extra


def test_the_demo_walks_the_decisions_in_order_and_exits_0(demo: subprocess.CompletedProcess[str]) -> None:
    assert demo.returncode == 0, demo.stdout + demo.stderr
    decisions = [row["decision"] for row in rows(demo.stdout)]
    assert decisions == ["ALLOW", "ALLOW", "DEGRADE", "CHECKPOINT", "APPROVED", "ALLOW", "DENY"], demo.stdout
    assert ANSI_ESCAPE not in demo.stdout  # plain text when not on a terminal


def test_the_demo_shows_the_advice_the_checkpoint_and_the_denial(demo: subprocess.CompletedProcess[str]) -> None:
    by_decision = {row["decision"]: row for row in rows(demo.stdout)}
    degrade = by_decision["DEGRADE"]["rest"]
    assert "model gpt-4o-mini" in degrade
    assert re.search(r"model gpt-4o -> gpt-4o-mini, context (\d+) -> (\d+) messages", degrade), degrade
    before, after = map(int, re.search(r"context (\d+) -> (\d+) messages", degrade).groups())  # type: ignore[union-attr]
    assert after < before  # the context was trimmed
    # The operator approves the very checkpoint the agent stopped at.
    checkpoint = re.search(r"ck1\.\S+", by_decision["CHECKPOINT"]["rest"])
    assert checkpoint is not None, by_decision["CHECKPOINT"]["rest"]
    assert f"budgetwarden approve {checkpoint.group()} " in by_decision["APPROVED"]["rest"]
    assert "retry after" in by_decision["DENY"]["rest"]
    for row in rows(demo.stdout):  # every step that ran shows its cost and the budget left
        if row["decision"] in ("ALLOW", "DEGRADE"):
            assert re.search(r"cost \$\d+\.\d{4} .* remaining \d", row["rest"]), row.group()


def test_the_demo_stops_what_it_started(demo: subprocess.CompletedProcess[str]) -> None:
    assert demo.returncode == 0, demo.stdout + demo.stderr
    addresses = re.findall(r"127\.0\.0\.1:\d+", demo.stdout)
    assert len(set(addresses)) == 3, demo.stdout  # the sidecar, its admin listener, the model server
    assert not [addr for addr in set(addresses) if listening(addr)]
    assert "stopped the sidecar and the model server" in demo.stdout
