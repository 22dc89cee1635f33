"""The benchmark harness runs (for a second per scenario). It measures; it asserts nothing about speed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_harness_smoke_run() -> None:
    # The harness's sidecar reads its settings from this environment: with the production check deadline (250 ms),
    # a busy machine turns some checks into fail-mode answers, which the harness counts as errors. The smoke run is
    # about every check being answered by the store, so it gets the tests' generous deadlines.
    # Likewise the overload bounds: on a busy machine the open-loop scenario offers more than the sidecar serves, and
    # the calls it refuses (as it should) would count as errors here. Overload is bench/overload.py's to measure.
    env = {
        **os.environ,
        "BUDGETWARDEN_CHECK_DEADLINE_MS": "30000",
        "BUDGETWARDEN_STORE_DEADLINE_MS": "30000",
        "BUDGETWARDEN_MAX_PENDING_CALLS": "0",
        "BUDGETWARDEN_MAX_CHECKS_IN_FLIGHT": "0",
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "harness.py"), "--smoke", "--processes", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = [
        cell.strip() for cell in next(line for line in lines if line.startswith("| scenario")).strip("|").split("|")
    ]
    rows = [
        dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
        for line in lines
        if line.startswith("| ") and not line.startswith(("| scenario", "|---"))
    ]
    assert {"floor", "naive", "budgetwarden"} <= {row["server"] for row in rows}
    assert any("CheckStream, 100 checks per message" in row["scenario"] for row in rows)
    assert rows
    assert all(row["errors"] == "0" for row in rows), done.stdout  # every check answered
    assert all(float(row["server CPU µs/check"]) > 0 for row in rows)
    assert "SERVING" in done.stdout


@pytest.mark.slow
def test_report_benchmark_smoke_run() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "reports.py"), "--records", "2000", "--threads", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.strip("|").split("|") for line in done.stdout.splitlines() if line.startswith("| ")]
    by_path = {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows[1:]}
    assert list(by_path) == [
        "store in-process",
        "store in-process, after checks",
        "unary Report, 500 records per call",
        "ReportStream, 20 messages of 500 per stream",
    ]
    for rate, _, applier_us, valkey_us in by_path.values():
        assert float(rate.replace(",", "")) > 0
        assert float(applier_us.replace(",", "")) > 0
        assert float(valkey_us.replace(",", "")) > 0
