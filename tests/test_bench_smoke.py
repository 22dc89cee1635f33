"""The benchmark harness runs (for a second per scenario). It measures; it asserts nothing about speed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_harness_smoke_run() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "harness.py"), "--smoke", "--processes", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "scenario" not in line]
    servers = {row.split("|")[2].strip() for row in rows if not row.startswith("|---")}
    assert {"floor", "naive", "budgetwarden"} <= servers
    assert any("CheckStream, 100 checks per message" in row for row in rows)
    errors = [int(row.split("|")[-2]) for row in rows if not row.startswith("|---")]
    assert errors
    assert sum(errors) == 0  # every check answered
    assert "SERVING" in done.stdout
