"""What the benchmarks share: the machine description, percentiles, and how results are printed and appended."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def publish(lines: list[str], write: Path | None) -> None:
    """Print the result and, if asked, append it to a Markdown file (docs/benchmarks.md)."""
    report = "\n".join(lines)
    print(report)
    if write is not None:
        with write.open("a") as out:
            out.write("\n" + report)
