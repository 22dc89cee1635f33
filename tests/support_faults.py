"""Faults for tests and the fault benchmark (bench/faults.py): kill, stop and restart of a Redis-compatible server and
of a ``budgetwarden serve`` process, a Redis made slow by a delay proxy, and a load that records what every call came
to while they happen.

Every fault is real: signals to real processes, a real Valkey behind the proxy. Nothing here imitates Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from budgetwarden.store._embedded import EmbeddedRedis
from budgetwarden_client import BudgetClient, pb
from budgetwarden_client._step import OVERLOADED

from support import SERVE_DEADLINE_ENV, free_port, wait_for_exit

WAIT_S = 120.0  # a bound on waiting for a condition (a start, a recovery), never a pace
ACKED = (pb.REPORT_STATUS_APPLIED, pb.REPORT_STATUS_UNRESERVED)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> float:
    """Seconds until ``condition`` held; fails after ``timeout`` naming ``what``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"timed out after {timeout:.0f}s waiting until {what}"
        time.sleep(0.02)
    return time.monotonic() - started


# --- a slow Redis --------------------------------------------------------------------------------------------------


class DelayProxy:
    """A TCP proxy in front of a server that holds every chunk of bytes, in each direction, for ``delay_s`` (settable
    at any time, 0 by default) before passing it on, in order. It runs its own event loop on a thread.

    The server behind it answers every command for real; the proxy only makes those answers late, as a Redis on a
    congested network or a saturated host would."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.delay_s = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="delay-proxy")
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> DelayProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port), self._loop
        ).result(30)
        return self

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            await asyncio.gather(
                self._pipe(client_reader, server_writer),
                self._pipe(server_reader, client_writer),
                return_exceptions=True,
            )
        finally:
            self._handlers.discard(handler)
            for writer in (client_writer, server_writer):
                writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Bytes from ``reader`` to ``writer``, each chunk sent ``delay_s`` after it arrived (a queue keeps the order
        and lets the next chunks be read meanwhile, so the delay adds latency, not a bound on throughput)."""
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, chunk = await held.get()
                if not chunk:
                    writer.close()
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while True:
                chunk = await reader.read(1 << 16)
                await held.put((time.monotonic() + self.delay_s, chunk))
                if not chunk:
                    break
            await sender
        finally:
            sender.cancel()

    def close(self) -> None:
        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            handlers = list(self._handlers)
            for handler in handlers:
                handler.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()


# --- faults of processes -------------------------------------------------------------------------------------------


def freeze(pid: int) -> None:
    """SIGSTOP: the process holds its sockets and its memory but answers nothing (a stalled host, a long GC pause)."""
    os.kill(pid, signal.SIGSTOP)


def thaw(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


class RedisFaults:
    """Kill, stop and restart of a Redis-compatible child server (``EmbeddedRedis``) on a fixed port.

    A restart replays the server's append-only file when it has one; call ``restart`` from a thread that lives as long
    as the server should (see ``EmbeddedRedis.spawn``)."""

    def __init__(self, server: EmbeddedRedis) -> None:
        assert server.port is not None, "faults need a server on a TCP port (a proxy can stand in front of it)"
        self.server = server

    @property
    def pid(self) -> int:
        pid = self.server.pid
        assert pid is not None, "the server is not running"
        return pid

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would end it: nothing is flushed."""
        os.kill(self.pid, signal.SIGKILL)
        process = self.server._process
        assert process is not None
        process.wait(30)

    def stop(self) -> None:
        freeze(self.pid)

    def resume(self) -> None:
        thaw(self.pid)

    def restart(self) -> None:
        """Start the server again on the same port and data dir, and wait until it answers (its file loaded)."""
        self.server.spawn()
        self.server.wait_ready(WAIT_S)


@dataclass
class ServedSidecar:
    """One ``budgetwarden serve`` child process with the given settings (as BUDGETWARDEN_* variables); it can be
    killed, stopped, resumed and started again on the same address. Its stderr goes to ``log_path`` (appended)."""

    settings: dict[str, str]
    log_path: Path
    addr: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("BUDGETWARDEN_")}
        env |= SERVE_DEADLINE_ENV
        env |= {"BUDGETWARDEN_LISTEN": self.addr, "BUDGETWARDEN_LOG_FORMAT": "text", "OTEL_SDK_DISABLED": "true"}
        env |= {f"BUDGETWARDEN_{name.upper()}": value for name, value in self.settings.items()}
        return env

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the sidecar was never started"
        assert self.proc.poll() is None, "the sidecar is not running"
        return self.proc.pid

    def start(self) -> ServedSidecar:
        assert self.proc is None or self.proc.poll() is not None, "the sidecar runs already"
        if self._log is None:
            self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "budgetwarden", "serve"],
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        wait_for(self._decides, f"budgetwarden serve on {self.addr} decides a check\n{self.log()}")
        return self

    def _decides(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, f"budgetwarden serve exited with {self.proc.returncode}:\n{self.log()}"
        return decides(self.addr)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        freeze(self.pid)

    def resume(self) -> None:
        thaw(self.pid)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            thaw(self.proc.pid)  # a stopped process would not act on SIGTERM
            self.proc.terminate()
            wait_for_exit(self.proc, WAIT_S, self.log)
        if self._log is not None:
            self._log.close()
            self._log = None


def decides(addr: str, tenant_id: str = "probe") -> bool:
    """Whether the sidecar at ``addr`` answers a check with a decision of its store (not its fail mode)."""
    with BudgetClient(addr, timeout=10) as client:
        try:
            answer = client.check(tenant_id=tenant_id, task_id="probe", step_id="probe", estimated_input_tokens=1)
        except grpc.RpcError:
            return False
    return not answer.from_fail_mode


# --- a load that records what each call came to --------------------------------------------------------------------


@dataclass
class Call:
    """One call of the load: when it started (monotonic), in which phase, how long it took and what it came to."""

    kind: str  # "check" or "report"
    phase: str
    started: float
    seconds: float
    outcome: str  # "decided", "fail-mode", "acked", a report status, or a gRPC status code name
    granted: int = 0
    key: str = ""  # a check's task, a report's idempotency key
    decision: str = ""  # a check's decision (DECISION_ALLOW, ...)


GRANTING = (pb.DECISION_ALLOW, pb.DECISION_DEGRADE)


def outcome_of(error: grpc.RpcError) -> str:
    """A failed call's outcome: "shed" for a check the sidecar refused at once as overloaded (the client library
    answers it with its fail mode), else the status code's name."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(error.details()).startswith(OVERLOADED):  # type: ignore[attr-defined]
        return "shed"
    return code.name


class FaultLoad:
    """Threads that check steps of a few tasks (each with an explicit ceiling) and report usage with idempotency keys,
    without pause, each call with ``timeout`` seconds, until ``stop``; every call is kept as a ``Call`` under the
    phase current when it started (``phase``, set by the test)."""

    def __init__(
        self,
        addr: str,
        *,
        tenant_id: str,
        tasks: int = 2,
        ceiling: int = 5_000,
        tokens: int = 100,
        checkers: int = 3,
        reporters: int = 1,
        timeout: float = 20.0,
    ) -> None:
        self.addr = addr
        self.tenant_id = tenant_id
        self.task_ids = [f"ceiling-{n}" for n in range(tasks)]
        self.ceiling = ceiling
        self.tokens = tokens
        self.timeout = timeout
        self.phase = "before"
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._checking, daemon=True, name=f"checker-{n}") for n in range(checkers)
        ] + [threading.Thread(target=self._reporting, daemon=True, name=f"reporter-{n}") for n in range(reporters)]

    def __enter__(self) -> FaultLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(self.timeout + WAIT_S)
        assert not any(thread.is_alive() for thread in self._threads), "a load thread hangs"

    def _next(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    def _keep(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)

    def _checking(self) -> None:
        with BudgetClient(self.addr, timeout=self.timeout) as client:
            while not self._stopping.is_set():
                n = self._next()
                phase, started = self.phase, time.monotonic()
                task_id = self.task_ids[n % len(self.task_ids)]
                try:
                    answer = client.check(
                        tenant_id=self.tenant_id,
                        task_id=task_id,
                        step_id=f"s{n}",
                        estimated_input_tokens=self.tokens,
                        task_ceiling_tokens=self.ceiling,
                    )
                except grpc.RpcError as error:
                    took = time.monotonic() - started
                    self._keep(Call("check", phase, started, took, outcome_of(error), key=task_id))
                    continue
                outcome = "fail-mode" if answer.from_fail_mode else "decided"
                granted = answer.granted_tokens if answer.decision in GRANTING else 0
                decision = pb.Decision.Name(answer.decision)
                took = time.monotonic() - started
                self._keep(Call("check", phase, started, took, outcome, granted, key=task_id, decision=decision))

    def _reporting(self) -> None:
        with BudgetClient(self.addr, timeout=self.timeout) as client:
            while not self._stopping.is_set():
                key = f"r{self._next()}"
                record = pb.UsageRecord(
                    tenant_id=self.tenant_id,
                    task_id="reported",
                    step_id=key,
                    input_tokens=10,
                    output_tokens=1,
                    idempotency_key=key,
                )
                phase, started = self.phase, time.monotonic()
                try:
                    (result,) = client.report([record]).results
                except grpc.RpcError as error:
                    self._keep(Call("report", phase, started, time.monotonic() - started, error.code().name, key=key))
                    continue
                outcome = "acked" if result.status in ACKED else pb.ReportStatus.Name(result.status)
                self._keep(Call("report", phase, started, time.monotonic() - started, outcome, key=key))

    # --- what the calls came to ---

    def of(self, kind: str, phase: str | None = None) -> list[Call]:
        with self._lock:
            return [call for call in self.calls if call.kind == kind and (phase is None or call.phase == phase)]

    def count(self, kind: str, phase: str, outcome: str) -> int:
        return sum(1 for call in self.of(kind, phase) if call.outcome == outcome)

    def outcomes(self, kind: str, phase: str | None = None) -> Counter[str]:
        return Counter(call.outcome for call in self.of(kind, phase))

    def granted(self, task_id: str | None = None) -> int:
        """Tokens granted by decisions of the store (not by a fail mode), for one task or all."""
        return sum(
            call.granted
            for call in self.of("check")
            if call.outcome == "decided" and (task_id is None or call.key == task_id)
        )

    def denied_by_store(self, task_id: str) -> bool:
        """Whether the store has denied a check of ``task_id``: its ceiling is reached."""
        return any(
            call.outcome == "decided" and call.key == task_id and call.decision == "DECISION_DENY"
            for call in self.of("check")
        )

    def fail_mode_granted(self) -> int:
        return sum(call.granted for call in self.of("check") if call.outcome == "fail-mode")

    def acked_keys(self) -> list[str]:
        return [call.key for call in self.of("report") if call.outcome == "acked"]


def lost_reports(addr: str, tenant_id: str, keys: list[str]) -> list[str]:
    """The acknowledged reports (by idempotency key) that the store no longer knows: sent again, each must come back
    DUPLICATE (applied once already)."""
    lost: list[str] = []
    with BudgetClient(addr, timeout=60) as client:
        for start in range(0, len(keys), 200):
            batch = keys[start : start + 200]
            records = [
                pb.UsageRecord(
                    tenant_id=tenant_id, task_id="reported", step_id=key, input_tokens=10, output_tokens=1,
                    idempotency_key=key,
                )
                for key in batch
            ]  # fmt: skip
            replies = client.report(records).results
            lost += [
                key for key, reply in zip(batch, replies, strict=True) if reply.status != pb.REPORT_STATUS_DUPLICATE
            ]
    return lost


def task_counted(addr: str, tenant_id: str, task_id: str) -> tuple[int, int, int | None]:
    """What the store holds for a task's ceiling: (used, reserved, limit)."""
    with BudgetClient(addr, timeout=60) as client:
        budget = client.get_budget(tenant_id=tenant_id, task_id=task_id)
    (scope,) = [scope for scope in budget.scopes if scope.kind == pb.SCOPE_KIND_TASK]
    return scope.used_tokens, scope.reserved_tokens, scope.limit_tokens if scope.HasField("limit_tokens") else None


@contextlib.contextmanager
def phase(load: FaultLoad, name: str) -> Iterator[None]:
    """Calls started inside the block are counted under ``name``; after it, under "after"."""
    load.phase = name
    try:
        yield
    finally:
        load.phase = "after"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summary(load: FaultLoad, recovery_s: float) -> dict[str, Any]:
    """The figures of one fault run for the benchmark's table."""
    during = load.of("check", "fault")
    seconds = [call.seconds for call in during]
    return {
        "checks_during": len(during),
        "outcomes_during": dict(load.outcomes("check", "fault")),
        "p50_ms_during": percentile(seconds, 0.5) * 1000,
        "max_ms_during": max(seconds, default=float("nan")) * 1000,
        "recovery_s": recovery_s,
        "granted": load.granted(),
        "fail_mode_granted": load.fail_mode_granted(),
        "ceiling": load.ceiling * len(load.task_ids),
        "acked_reports": len(load.acked_keys()),
        "reports": dict(load.outcomes("report")),
    }
