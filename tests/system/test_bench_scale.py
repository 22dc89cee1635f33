"""The scale benchmark and the Redis baseline run (tiny N, a second per scenario). They measure; nothing here asserts
anything about speed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def table_rows(stdout: str) -> list[list[str]]:
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


@pytest.mark.slow
def test_scale_smoke_run() -> None:
    out = run_bench("scale.py").stdout
    assert "### Cost per check vs. active tasks" in out
    header = next(line for line in out.splitlines() if line.startswith("| active tasks"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    rows = [row for row in table_rows(out) if row[0][0].isdigit() and len(row) == len(columns)]
    assert [row[0] for row in rows] == ["100", "1,000", "100 again, at the end"]
    assert all(row[columns.index("errors")] == "0" for row in rows)  # every check answered
    assert all(float(row[columns.index("checks/s")].replace(",", "")) > 0 for row in rows)
    assert "Ratios, 1,000 vs. 100 active tasks" in out
    for key in ("task hash", "reservation record", "leases sorted set", "window `win:day:"):
        assert f"| {key}" in out
    assert "INFO used_memory growth over the preload / tasks" in out


@pytest.mark.slow
def test_redis_baseline_smoke_run() -> None:
    out = run_bench("redis_baseline.py").stdout
    if shutil.which("redis-benchmark") is None:
        assert "redis-benchmark not found (apt-get install redis-tools); Redis baseline skipped" in out
        return
    assert "### Redis alone: the check script under redis-benchmark" in out
    rows = {row[0]: row for row in table_rows(out)}
    check = rows["check.lua (budgetwarden's check)"]
    assert float(check[1].replace(",", "")) > 0
    assert "naive one-counter script (bench/baselines.py)" in rows
    assert "- Redis alone:" in out
    assert "EVALSHA" in out
