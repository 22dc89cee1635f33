"""A server's profile under load with py-spy (a sampling profiler: it reads the process from outside, so the server
runs its own code unchanged), and where its busy samples went.

Sampled with ``--native``, which pauses the process at each sample (py-spy cannot read native stacks otherwise): the
server runs slower while sampled, so the shares are what to read, not its rate. py-spy's raw format is one line per
distinct stack, ``frame;frame;...;frame COUNT``, outermost first, a Python frame written ``function (path:line)`` and
a native one ``function (library)``. A sample whose innermost frame is a blocking wait (epoll, a lock) is a thread
waiting and is left out.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# Innermost native frames of a thread that waits (py-spy samples threads blocked in native code as busy).
_WAITING = ("epoll_wait ", "epoll_pwait", "poll ", "ppoll ", "select ", "pthread_cond", "futex", "sem_", "nanosleep ")
_PYTHON_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>[^():]+\.py):\d+\)$")

# Where a sample's innermost Python frame is, by its path: the sidecar's own packages first.
_AREAS = (
    ("budgetwarden/transport/", "budgetwarden transport (servicers, validation, encoding, admission)"),
    ("budgetwarden/limiter.py", "budgetwarden limiter"),
    ("budgetwarden/allowance.py", "budgetwarden local allowance"),
    ("budgetwarden/domain/", "budgetwarden domain (plans, decisions)"),
    ("budgetwarden/store/", "budgetwarden store (keys, Redis calls, replies)"),
    ("budgetwarden/telemetry/", "budgetwarden telemetry"),
    ("budgetwarden/", "budgetwarden, other"),
    ("grpc/", "gRPC (grpc.aio, its Cython core and poller)"),
    ("asyncio/", "asyncio event loop (and the gRPC callbacks it runs)"),
    ("redis/", "redis-py"),
    ("google/protobuf/", "protobuf"),
    ("opentelemetry/", "OpenTelemetry SDK"),
)


def _command() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"  # the venv's, which `make dev` installs
    return str(beside) if beside.exists() else shutil.which("py-spy")


def available() -> bool:
    return _command() is not None


def record(pid: int, seconds: float, out: Path, *, rate: int = 200) -> subprocess.Popen[bytes]:
    """Starts sampling ``pid`` for ``seconds`` into ``out``; wait on it."""
    command = [
        _command() or "py-spy", "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
        "--rate", str(rate), "--format", "raw", "--native", "--output", str(out),
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stacks(raw: str) -> list[tuple[list[str], int]]:
    """Each sampled stack (outermost frame first) that was not waiting, and its samples."""
    stacks = []
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            frames = stack.split(";")
            if not frames[-1].startswith(_WAITING):
                stacks.append((frames, int(count)))
    return stacks


def areas(raw: str) -> tuple[int, Counter[str]]:
    """Busy samples, and how many of them had their innermost Python frame in each area."""
    shares: Counter[str] = Counter()
    for frames, samples in _stacks(raw):
        shares[_area(frames)] += samples
    return sum(shares.values()), shares


def _area(frames: list[str]) -> str:
    for frame in reversed(frames):
        match = _PYTHON_FRAME.match(frame)
        if match is None:
            continue
        path = match["path"]
        for prefix, name in _AREAS:
            if prefix in path:
                return name
        return "other Python"
    return "no Python frame (a native thread: gRPC's poller)"


def summary(raw: str) -> list[str]:
    """Markdown lines: each area's share of the busy samples, largest first."""
    total, shares = areas(raw)
    if not total:
        return ["(no busy samples)"]
    lines = [f"{total:,} busy samples (waits left out); by the innermost Python frame of each:", ""]
    lines += [f"- {name}: {count / total:.1%}" for name, count in shares.most_common()]
    leaves = innermost(raw)
    lines += ["", "The innermost frames most sampled:", ""]
    lines += [f"- `{frame}`: {count / total:.1%}" for frame, count in leaves.most_common(8)]
    return lines


def innermost(raw: str) -> Counter[str]:
    """Busy samples by their innermost frame."""
    leaves: Counter[str] = Counter()
    for frames, samples in _stacks(raw):
        leaves[frames[-1]] += samples
    return leaves
