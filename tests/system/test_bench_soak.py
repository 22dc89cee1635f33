"""The soak benchmark runs (a few seconds, a sample every second). It measures; nothing here asserts anything about
speed or about what levels off in so short a run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from soak import key_kind  # noqa: E402


def table(stdout: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the Markdown table whose header starts with `first_header`, by column name."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)))
    return rows


@pytest.mark.slow
def test_soak_smoke_run() -> None:
    # The production check deadline (250 ms) on a busy machine turns some checks into fail-mode answers; the smoke run
    # is about every call being answered by the store, so it gets generous deadlines.
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "0.1", "--sample-seconds", "1", "--rate", "20",
         "--workers", "4", "--tenants", "5", "--active-tasks", "50", "--reload-seconds", "2",
         "--check-deadline-ms", "30000", "--store-deadline-ms", "30000", "--rpc-timeout", "60"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "### Soak: memory, fds and keys over 0.1 minutes of mixed load" in out
    samples = table(out, "elapsed")
    assert len(samples) >= 3  # the first sample, before any load, and at least two more
    assert all(row["errors"] == "0" and row["fail-mode answers"] == "0" for row in samples)
    assert sum(int(row["checks in interval"].replace(",", "")) for row in samples) > 0
    assert all(float(row["sidecar RSS MB"]) > 0 and int(row["open fds"]) > 0 for row in samples)
    assert int(samples[-1]["keys"].replace(",", "")) > 0
    assert "; 0 errors;" in out
    assert "; 0 fail-mode answers" in out
    trends = {row["quantity"]: row for row in table(out, "quantity")}
    assert {"sidecar RSS MB", "sidecar open fds", "Valkey used_memory MiB", "Valkey keys"} <= set(trends)
    assert all(row["levels off"] in {"yes", "NO"} for row in trends.values())


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        (b"bw1:{acme}:task:0f", "task"),
        (b"bw1:{acme}:idem:resv:0f", "idem"),
        (b"bw1:{acme}:ckpt:0f", "ckpt"),
        (b"bw1:{acme}:ckpt:open", "ckpt:open"),
        (b"bw1:{acme}:notify", "notify"),
        (b"bw1:{acme}:notify:dropped", "notify:dropped"),  # a string beside the stream: no XLEN on it
        (b"bw1:audit", "other"),
    ],
)
def test_the_soak_sorts_keys_by_kind(key: bytes, kind: str) -> None:
    assert key_kind(key) == kind
