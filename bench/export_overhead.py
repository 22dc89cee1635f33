"""Does exporting metrics slow checks down? Checks/s and latency with OTel export off and on, in the same run.

Two `budgetwarden serve` processes on one Valkey: one with metrics off, one exporting OTLP/gRPC every second to a
receiver in this process and serving a Prometheus endpoint that is scraped every second. The phases alternate
(off, on, recording only, twice) so drift on a shared machine hits both alike.

    .venv/bin/python bench/export_overhead.py [--seconds 5] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from concurrent import futures
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as otlp
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as otlp_grpc

from budgetwarden.store._embedded import EmbeddedRedis, free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, percentile, publish, wait_serving
from counting_stall import small_checks


class Receiver(otlp_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.exports = 0

    def Export(self, request: Any, context: Any) -> otlp.ExportMetricsServiceResponse:  # noqa: N802
        self.exports += 1
        return otlp.ExportMetricsServiceResponse()


def serve(url: str, env: dict[str, str], extra: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    addr = f"127.0.0.1:{free_port()}"
    args = [
        sys.executable,
        "-m",
        "budgetwarden",
        "serve",
        "--listen",
        addr,
        "--redis-url",
        url,
        "--log-level",
        "WARNING",
    ]
    process = subprocess.Popen([*args, *extra], env=env)
    wait_serving(addr)
    return process, addr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()

    receiver = Receiver()
    otlp_server = grpc.server(futures.ThreadPoolExecutor(2))
    otlp_grpc.add_MetricsServiceServicer_to_server(receiver, otlp_server)
    otlp_port = otlp_server.add_insecure_port("127.0.0.1:0")
    otlp_server.start()
    scrapes = 0
    with tempfile.TemporaryDirectory() as tmp:
        valkey = EmbeddedRedis(Path(tmp), port=free_port(), persistent=False)
        url = valkey.start()
        base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        off, off_addr = serve(url, {**base, "OTEL_SDK_DISABLED": "true"}, [])
        metrics_port = free_port()
        on_env = {
            **base,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        }
        on, on_addr = serve(url, on_env, ["--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"])
        # Recording only: a Prometheus reader that nobody scrapes, so nothing is ever exported.
        quiet_port = free_port()
        quiet, quiet_addr = serve(url, base, ["--metrics-port", str(quiet_port), "--metrics-host", "127.0.0.1"])
        stop = threading.Event()

        def scraper() -> None:
            nonlocal scrapes
            while not stop.wait(1.0):
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
                    response.read()
                scrapes += 1

        scraping = threading.Thread(target=scraper, daemon=True)
        scraping.start()
        results: dict[str, list[list[float]]] = {"off": [], "on": [], "quiet": []}
        try:
            for addr in (off_addr, on_addr, quiet_addr):
                small_checks(addr, 1.0, args.threads)
            for _ in range(2):
                results["off"].append(small_checks(off_addr, args.seconds, args.threads))
                results["on"].append(small_checks(on_addr, args.seconds, args.threads))
                results["quiet"].append(small_checks(quiet_addr, args.seconds, args.threads))
        finally:
            stop.set()
            for process in (off, on, quiet):
                process.terminate()
                process.wait(30)
            valkey.stop()
            otlp_server.stop(0)

    def summary(runs: list[list[float]]) -> tuple[float, float, float]:
        flat = [x for run in runs for x in run]
        rate = len(flat) / (args.seconds * len(runs))
        return rate, statistics.median(flat) * 1e3, percentile(flat, 0.99) * 1e3

    off_rate, off_p50, off_p99 = summary(results["off"])
    on_rate, on_p50, on_p99 = summary(results["on"])
    quiet_rate, quiet_p50, quiet_p99 = summary(results["quiet"])
    lines = [
        f"### Metrics export on vs. off ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python bench/export_overhead.py --seconds {args.seconds:g}` "
        f"({args.threads} client threads of 10-token checks, closed loop; phases alternate off / on / recording-only, "
        "twice; export on = "
        f"OTLP/gRPC every 1 s ({receiver.exports} exports received) plus a Prometheus scrape every 1 s ({scrapes} "
        "scrapes)).",
        "",
        "| metrics | checks/s | p50 ms | p99 ms |",
        "|---|---|---|---|",
        f"| off (`OTEL_SDK_DISABLED=true`) | {off_rate:,.0f} | {off_p50:.2f} | {off_p99:.2f} |",
        f"| recording only (a reader nobody scrapes) | {quiet_rate:,.0f} | {quiet_p50:.2f} | {quiet_p99:.2f} |",
        f"| on (recording and exporting) | {on_rate:,.0f} | {on_p50:.2f} | {on_p99:.2f} |",
        "",
        f"Ratios in the same run, vs. off: recording only {quiet_rate / off_rate:.2f} (throughput), exporting too "
        f"{on_rate / off_rate:.2f}; p99 {quiet_p99 / off_p99:.2f} and {on_p99 / off_p99:.2f}.",
        "",
    ]
    publish(lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
