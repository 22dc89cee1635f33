"""What the benchmarks share: the machine description, percentiles, a process's CPU time, how results are printed
and recorded, and waiting for a server to serve."""

from __future__ import annotations

import os
import platform
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


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


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# Where a new result goes in docs/benchmarks.md, and where the result it supersedes goes in the archive beside it.
LATEST_MARKER = "<!-- latest runs: bench/_common.py inserts each new result below this line"
ARCHIVE_MARKER = "<!-- archived runs: bench/_common.py moves superseded results below this line"
_RUN_DATE = re.compile(r"\s*\(\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC\)\s*$")


def publish(lines: list[str], write: Path | None) -> None:
    """Print the result and, if asked, write it into a Markdown file (docs/benchmarks.md): see ``record``."""
    report = "\n".join(lines)
    print(report)
    if write is not None:
        record(report, write)


def record(report: str, path: Path) -> None:
    """Put a result (a ``### title (date)`` section) at the top of the latest runs of ``path``, just below the line
    holding LATEST_MARKER, and move the earlier result of the same title (superseded) to the top of the runs of the
    archive beside it (``benchmarks-archive.md``). A file without the marker gets the result at its end."""
    text = path.read_text() if path.exists() else ""
    marker_at = text.find(LATEST_MARKER)
    if marker_at < 0:
        path.write_text(text + "\n" + report + "\n")
        return
    runs_at = text.index("\n", marker_at) + 1
    end = re.search(r"(?m)^## ", text[runs_at:])
    runs_end = runs_at + end.start() if end else len(text)
    sections = _sections(text[runs_at:runs_end])
    title = _title(report)
    superseded = [section for section in sections if _title(section) == title]
    kept = [section for section in sections if _title(section) != title]
    if superseded:
        _archive(superseded, path.with_name(f"{path.stem}-archive.md"))
    runs = "\n\n".join([report.strip(), *kept])
    rest = text[runs_end:].lstrip("\n")
    path.write_text(text[:runs_at] + "\n" + runs + ("\n\n" + rest if rest else "\n"))


def _sections(runs: str) -> list[str]:
    """The ``### `` sections of a part of the file, each with the text under it."""
    return [part.strip() for part in re.split(r"(?m)^(?=### )", runs) if part.strip()]


def _title(section: str) -> str:
    """A result's heading without its date: what an earlier run of the same benchmark is headed too."""
    return _RUN_DATE.sub("", section.splitlines()[0])


def _archive(sections: list[str], path: Path) -> None:
    text = path.read_text() if path.exists() else f"# Benchmarks archive\n\n{ARCHIVE_MARKER} -->\n"
    if ARCHIVE_MARKER not in text:
        text = f"{text.rstrip()}\n\n{ARCHIVE_MARKER} -->\n"
    runs_at = text.index("\n", text.index(ARCHIVE_MARKER)) + 1
    runs = "\n\n".join([*sections, text[runs_at:].strip()]).rstrip()
    path.write_text(text[:runs_at] + "\n" + runs + "\n")


def wait_serving(addr: str, timeout: float = 30.0) -> float:
    """Waits until the server at ``addr`` reports SERVING on gRPC health; returns how long that took."""
    started = time.perf_counter()
    # gRPC waits about 1 s (with jitter) before connecting again after a refused connect, which made the time measured
    # here 1.0-1.2 or 2.5-2.8 s for the same sidecar, whichever backoff the poll fell into; poll with a short backoff.
    options = [
        ("grpc.initial_reconnect_backoff_ms", 10),
        ("grpc.min_reconnect_backoff_ms", 10),
        ("grpc.max_reconnect_backoff_ms", 50),
    ]
    with grpc.insecure_channel(addr, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - started
            except grpc.RpcError:
                pass
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"{addr} did not serve within {timeout}s")
            time.sleep(0.01)


# bench/vary_body.c, preloaded into h2load, overwrites these marks in the one request body h2load posts, so that each
# request is a new step (and task) rather than a replay.
STEP_MARK = "#########"
TASK_MARK = "&&&&"


def build_shim(tmp: Path) -> Path:
    """bench/vary_body.c as a shared object, built with the system C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("h2load's request shim needs a C compiler (Debian: gcc) for bench/vary_body.c")
    shim = tmp / "vary_body.so"
    source = Path(__file__).resolve().parent / "vary_body.c"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(shim), str(source), "-ldl"], check=True)
    return shim


def write_grpc_body(path: Path, message: bytes) -> Path:
    """A gRPC length-prefixed message (uncompressed), as h2load posts it."""
    path.write_bytes(b"\x00" + struct.pack(">I", len(message)) + message)
    return path
