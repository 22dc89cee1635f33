"""Helpers shared by tests (importable as ``support``; pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import multiprocessing
import os
import queue
import random
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar
from unittest import mock

import redis

from budgetwarden.app._config import Settings
from budgetwarden.app._sidecar import Sidecar
from budgetwarden.cli import main
from budgetwarden.limiter import Clock
from budgetwarden.store._embedded import EmbeddedRedis

T = TypeVar("T")

MINUTE_MS = 60_000
# A check waits this long for Redis before the fail mode answers, unless a test sets its own: a busy machine may take
# longer than the production default (250 ms), and a fail-mode answer the test did not ask for would fail it.
TEST_CHECK_DEADLINE_MS = 30_000
# Likewise every other store call (reports, releases, reads; production default 1 s): a batch of hundreds of records
# on a loaded machine may take longer, and an UNAVAILABLE the test did not ask for would fail it.
TEST_STORE_DEADLINE_MS = 30_000
TEST_STORE_PING_TIMEOUT_MS = 10_000


class SettableClock:
    """A clock that stands still until a test moves it (epoch milliseconds), for a sidecar or a limiter.

    By default it stands in the middle of the minute before the wall clock's: a minute window cannot roll over under
    a test, and it is never ahead of the wall clock, so a usage record stamped with the real time (as the CLI stamps
    them) is counted at this clock's time, and is never "in the future"."""

    def __init__(self, now_ms: int | None = None) -> None:
        if now_ms is None:
            now_ms = (time.time_ns() // 1_000_000 // MINUTE_MS - 1) * MINUTE_MS + MINUTE_MS // 2
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, seconds: float) -> None:
        self.now_ms += round(seconds * 1000)


# Ports the tests listen on come from below the kernel's ephemeral range: a port from there (what binding port 0
# gives) can be taken as the source port of any outgoing connection between the moment it is chosen and the moment the
# server binds it, and with two xdist workers and many clients that happens. Below the range only explicit binds take
# ports, so each xdist worker gets its own slice and walks it from a random place (two test runs on one machine rarely
# meet), skipping any port something else already holds.
_PORT_FLOOR = 10_000
_MIN_PORTS_PER_WORKER = 500


def _ephemeral_range_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default, and what this machine and CI use


def _worker_ports() -> Iterator[int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) if worker.isdigit() else 0
    workers = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), index + 1)
    span = (_ephemeral_range_start() - _PORT_FLOOR) // workers
    assert span >= _MIN_PORTS_PER_WORKER, (
        f"only {span} ports per xdist worker between {_PORT_FLOOR} and the ephemeral range; lower the range's start "
        "(/proc/sys/net/ipv4/ip_local_port_range) or run fewer workers"
    )
    first = _PORT_FLOOR + index * span
    offset = random.randrange(span)
    for step in range(span):
        yield first + (offset + step) % span


_ports = _worker_ports()


def free_port() -> int:
    """A loopback port nobody listens on, from this worker's slice below the ephemeral range (see above)."""
    for port in _ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # held by something else on the machine, or still in TIME_WAIT
            return port
    raise AssertionError("this xdist worker has used every port of its slice")


def sidecar_settings(redis_url: str, /, **overrides: Any) -> Settings:
    """A test sidecar's settings: a free loopback port, the given Redis, text logs, the generous deadlines above."""
    values: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "redis_url": redis_url,
        "log_format": "text",
        "check_deadline_ms": TEST_CHECK_DEADLINE_MS,
        "store_deadline_ms": TEST_STORE_DEADLINE_MS,
        # Readiness turns NOT_SERVING when a ping takes longer than this; 500 ms (production) is missed by a loaded
        # machine, and readiness the test did not ask about would flap. Tests of a stalled store set their own.
        "store_ping_timeout_ms": TEST_STORE_PING_TIMEOUT_MS,
    }
    values.update(overrides)
    return Settings(**values)


CONDITION_WAIT_S = 120.0  # a bound on waiting for a condition on a busy machine, not a pace
# A test client's deadline per call. The client's default (5 s) is missed on a busy machine with several calls in
# flight, and the sidecar then answers with the fail mode within what is left: an answer the test did not ask about.
TEST_RPC_TIMEOUT_S = 120.0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = CONDITION_WAIT_S) -> None:
    """Polls ``condition`` until it holds; a Redis or socket error counts as "not yet" (a node restarting, a failover
    under way). Fails naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (redis.RedisError, OSError):
            pass
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting until {what}"
        time.sleep(0.05)


def wait_for_exit(proc: subprocess.Popen[Any], timeout: float, log: Callable[[], str]) -> int:
    """The exit code of ``proc``; one that does not exit within ``timeout`` fails with its log and where each of its
    threads is (py-spy, a dev dependency), so a hang says where it hangs."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        dump = subprocess.run([spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True, timeout=60)
        stacks = dump.stdout + dump.stderr
        message = f"pid {proc.pid} did not exit within {timeout}s\n--- stacks\n{stacks}--- log\n{log()}"
        raise AssertionError(message) from None


# What a `budgetwarden serve` child of a test gets: the same generous deadlines as in-process sidecars (a busy machine
# must not turn a slow script into a fail-mode answer or UNAVAILABLE that the test did not ask for).
SERVE_DEADLINE_ENV = {
    "BUDGETWARDEN_CHECK_DEADLINE_MS": str(TEST_CHECK_DEADLINE_MS),
    "BUDGETWARDEN_STORE_DEADLINE_MS": str(TEST_STORE_DEADLINE_MS),
}

# Readiness follows the store closely: a ping every 50 ms, so a dead or restarted server is noticed at once.
FAST_WATCH: dict[str, Any] = {"store_ping_interval_seconds": 0.05, "store_ping_timeout_ms": 500}


class RunningSidecar:
    """A sidecar serving on a free loopback port from its own thread and event loop, on the given clock."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.addr = settings.listen
        self.clock: Clock = clock if clock is not None else SettableClock()
        self.sidecar: Sidecar | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> RunningSidecar:
        self._thread.start()
        self.sidecar = Sidecar(self.settings, clock=self.clock)
        asyncio.run_coroutine_threadsafe(self.sidecar.start(), self._loop).result(30)
        return self

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the sidecar's loop (to reach its internals)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def _stacks(self) -> str:
        """Where each thread and each task of the sidecar's loop is, for a failure message."""
        out = io.StringIO()
        for ident, frame in sys._current_frames().items():
            out.write(f"--- thread {ident}\n{''.join(traceback.format_stack(frame))}")
        for task in asyncio.all_tasks(self._loop):
            out.write(f"--- task {task.get_name()}\n")
            task.print_stack(file=out)
        return out.getvalue()

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        if self.sidecar is not None:
            stopping = asyncio.run_coroutine_threadsafe(self.sidecar.stop(), self._loop)
            try:
                stopping.result(30)
            except TimeoutError:
                raise AssertionError(f"the sidecar did not stop within 30 s:\n{self._stacks()}") from None
            self.sidecar = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``budgetwarden`` in a clean environment (no inherited BUDGETWARDEN_* variables)."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("BUDGETWARDEN_")}
    environ.update(env or {})
    result = subprocess.run(
        [sys.executable, "-m", "budgetwarden", *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``budgetwarden`` in this process: ``main(argv)`` with stdout and stderr captured, in the same clean environment
    ``cli`` gives a subprocess. What it returns reads like ``cli``'s (exit code, stdout, stderr); an exception that
    escapes ``main`` (which a process would print as a traceback) fails the test where it happens."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("BUDGETWARDEN_")}
    environ.update(env or {})
    stdout, stderr = io.StringIO(), io.StringIO()
    with (
        mock.patch.dict(os.environ, environ, clear=True),
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's way out (usage errors, --help)
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    return subprocess.CompletedProcess(["budgetwarden", *args], code, stdout.getvalue(), stderr.getvalue())


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def run_processes(
    target: Callable[..., None],
    per_process: Sequence[tuple[Any, ...]],
    parties: int | None = None,
    *,
    timeout: float = 90.0,
) -> list[Any]:
    """Runs ``target(index, results, barrier, *args)`` in one spawned process per entry and returns their results.

    ``barrier`` has ``parties`` places (default: one per process) so workers can start their load together; each
    worker puts ``(index, traceback or None, result)`` on ``results``."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    barrier = ctx.Barrier(parties or len(per_process))
    procs = [
        ctx.Process(target=target, args=(index, results, barrier, *args), daemon=True)
        for index, args in enumerate(per_process)
    ]
    collected: dict[int, Any] = {}
    failures: list[str] = []
    try:
        for proc in procs:
            proc.start()
        for _ in procs:
            try:
                index, error, value = results.get(timeout=timeout)
            except queue.Empty:
                failures.append("a worker process gave no result in time")
                break
            if error is not None:
                failures.append(f"worker {index} failed:\n{error}")
            collected[index] = value
    finally:
        for proc in procs:
            if proc.pid is None:
                continue
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    assert not failures, "\n".join(failures)
    return [collected[index] for index in range(len(procs))]


class BlackHole:
    """A TCP server that accepts connections and never answers: a Redis that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    @property
    def as_redis(self) -> dict[str, Any]:
        """Sidecar settings that use it as Redis. Its readiness ping may time out soon: it never answers anyway, and a
        sidecar's start waits for its first ping."""
        return {"redis_url": f"redis://127.0.0.1:{self.port}/0", "store_ping_timeout_ms": 500}

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def embedded_of(running: RunningSidecar) -> EmbeddedRedis:
    """The embedded server a sidecar started (the test asserts there is one)."""
    assert running.sidecar is not None
    assert running.sidecar.embedded is not None
    return running.sidecar.embedded


def bench_module(filename: str) -> ModuleType:
    """A module of bench/ (not a package), loaded from its file."""
    path = Path(__file__).resolve().parents[1] / "bench" / filename
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem.lstrip('_')}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class AnswersWhenCancelled:
    """A stand-in for a Redis call to a stalled store that, when cancelled, answers anyway and so spends the
    cancellation, as redis-py can (a PING cancelled just as the server came back: 5 of 30 tries). ``entered`` is set
    once a call waits."""

    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.entered = asyncio.Event()

    async def __call__(self) -> Any:
        self.entered.set()
        try:
            await asyncio.Event().wait()  # nothing sets it: the store never answers
        except asyncio.CancelledError:
            return self.answer
        raise AssertionError("unreachable: nothing sets the event")
