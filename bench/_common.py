"""What the benchmarks share: the machine description, percentiles, a process's CPU time, how results are printed
and appended, and waiting for a server to serve."""

from __future__ import annotations

import os
import platform
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


def publish(lines: list[str], write: Path | None) -> None:
    """Print the result and, if asked, append it to a Markdown file (docs/benchmarks.md)."""
    report = "\n".join(lines)
    print(report)
    if write is not None:
        with write.open("a") as out:
            out.write("\n" + report)


def wait_serving(addr: str, timeout: float = 30.0) -> float:
    """Waits until the server at ``addr`` reports SERVING on gRPC health; returns how long that took."""
    started = time.perf_counter()
    with grpc.insecure_channel(addr) as channel:
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
