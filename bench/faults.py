"""Faults, long form: tests/system/test_faults.py with more rounds and longer faults, and a table of what happened.

    .venv/bin/python bench/faults.py [--write docs/reliability.md]

Runs the fault tests with BW_FAULTS_LONG=1 (3 rounds of each fault, each held for at least 5 s and 60 checks) and
collects the figures each test records (BW_FAULTS_RESULTS). The tests' assertions hold for the long form too: a
failing test fails this run. The table goes under the "## Faults" heading of the file given to --write (replacing
what was there).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import machine  # noqa: E402

HEADING = "## Faults"


def run_tests(results: Path, select: str | None) -> int:
    env = os.environ | {"BW_FAULTS_LONG": "1", "BW_FAULTS_RESULTS": str(results)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "tests/system/test_faults.py"]
    if select:
        command += ["-k", select]
    return subprocess.run(command, cwd=ROOT, env=env, check=False).returncode


def outcomes(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items(), key=lambda item: -item[1])) or "-"


def table(rows: list[dict[str, Any]], command: str, code: int) -> str:
    lines = [
        HEADING,
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Machine: {machine()}. Command: `{command}` (the fault tests of "
        "`tests/system/test_faults.py` in their long form; the short form runs in `make test`). "
        f"Tests: {'all passed' if code == 0 else f'FAILED (pytest exit code {code})'}.",
        "",
        "Each fault ran the given rounds under a load of 3 threads checking steps of 2 tasks (ceiling 5,000 tokens "
        "each, 100 per check) and 1 thread reporting usage with idempotency keys. Redis faults: an in-process "
        "sidecar, check deadline 500 ms, store deadline 1 s, client deadline 20 s. Sidecar faults: `budgetwarden "
        "serve` on the test Redis, client deadline 3 s (an unreachable sidecar is the client library's fail mode: "
        "UNAVAILABLE or DEADLINE_EXCEEDED). During: checks started while the fault lasted, and their latency as the "
        "client saw it; the fault lasts until the restarted or resumed process answers, so the few decided during it "
        "were started as the fault began or as the process came back (a load thread retries an UNAVAILABLE at once, "
        "hence the count for a killed sidecar). Recovery: the longest, over the rounds, from the fault's end to the "
        "first check decided by the store again. Granted: tokens granted by the store over both tasks (the load runs "
        "until the store denies both, so their ceilings are reached); fail-mode grants are what fail mode open "
        "allowed without the store. Lost: acknowledged reports the store did not know afterwards (each sent again "
        "must come back DUPLICATE).",
        "",
        "| fault | fail mode | rounds | checks during | outcomes during | p50 / max ms during | recovery s "
        "| granted / ceiling | fail-mode grants | reports acked | lost |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['fault']} | {row['fail_mode']} | {row['rounds']} | {row['checks_during']} | "
            f"{outcomes(row['outcomes_during'])} | {row['p50_ms_during']:.0f} / {row['max_ms_during']:.0f} | "
            f"{row['recovery_s']:.2f} | {row['granted']:,} / {row['ceiling']:,} | {row['fail_mode_granted']:,} | "
            f"{row['acked_reports']:,} | 0 |"
        )
    lines += [
        "",
        "The lost column is 0 because the test asserts it (a loss fails the run). What each durability setting "
        "promises: for a Redis killed by SIGKILL, `--durability aof-local` (WAITAOF 1 0 before each acknowledgement) "
        "is what guarantees every acknowledged report, since with `appendfsync everysec` Valkey may postpone its "
        "writes while an fsync is slow (tests/system/test_durability.py); a stopped Redis, a slow Redis and a killed "
        "or stopped sidecar lose nothing acknowledged with any setting (the sidecar acknowledges only what Redis "
        "accepted). Overspend: no task was granted more than its ceiling by the store, in any fault; fail mode open "
        "grants without the store by design (the fail-mode grants column), to be reconciled by the usage reports.",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Put ``section`` under its heading in ``path``, replacing an earlier one; other sections stay as they are."""
    text = path.read_text() if path.exists() else "# Reliability\n"
    pattern = re.compile(rf"(?ms)^{re.escape(HEADING)}\n.*?(?=^## |\Z)")
    found = pattern.search(text)
    text = pattern.sub(lambda _: section + "\n", text) if found else text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("-k", dest="select", default=None, help="only the tests pytest -k selects")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "faults.jsonl"
        code = run_tests(results, args.select)
        rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    command = " ".join([".venv/bin/python bench/faults.py", *sys.argv[1:]])
    section = table(rows, command, code)
    print(section)
    if args.write is not None:
        write_section(args.write, section)
    return code


if __name__ == "__main__":
    sys.exit(main())
