"""The h2load benchmark runs (a short round), and every request it sends is a new step: the preloaded shim
(bench/vary_body.c) varies the one body h2load posts. It measures; it asserts nothing about speed. h2load and a C
compiler come from Debian (`make test` and `make bench` install them: Makefile, SYSTEM_PACKAGES)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_h2load_smoke_run_sends_a_new_step_with_every_request() -> None:
    missing = [tool for tool in ("h2load", "cc") if shutil.which(tool) is None]
    assert not missing, f"{missing} not installed: `make system-packages` installs them (nghttp2-client, gcc)"
    # Generous deadlines, so that no check of a busy machine is answered by the fail mode (which reserves nothing and
    # would look like a replayed step).
    # The overload bounds off too: calls refused under a busy machine's overload are not what this run checks.
    env = {
        **os.environ,
        "BUDGETWARDEN_CHECK_DEADLINE_MS": "30000",
        "BUDGETWARDEN_STORE_DEADLINE_MS": "30000",
        "BUDGETWARDEN_MAX_PENDING_CALLS": "0",
        "BUDGETWARDEN_MAX_CHECKS_IN_FLIGHT": "0",
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "h2load.py"), "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = [cell.strip() for cell in next(line for line in lines if line.startswith("| scenario")).split("|")[1:-1]]
    rows = [
        dict(zip(header, (cell.strip() for cell in line.split("|")[1:-1]), strict=True))
        for line in lines
        if line.startswith(("| serial", "| 16 streams"))
    ]
    servers = {row["server"] for row in rows}
    assert servers == {"floor", "naive", "budgetwarden", "budgetwarden, batching off", "budgetwarden, redis-py"}
    for row in rows:
        assert row["failed"] == "0", row
        assert float(row["checks/s"].replace(",", "")) > 0, row
        if row["server"].startswith("budgetwarden"):
            # Every answered request reserved its own step; only the calls in flight when h2load stopped may be cut.
            leases, sent = (int(part.replace(",", "")) for part in row["new steps"].split(" of "))
            streams = 1 if row["scenario"].startswith("serial") else 16
            assert sent - streams <= leases <= sent, row
