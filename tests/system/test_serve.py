"""``budgetwarden serve`` as a real subprocess: embedded Redis, persistence, health, reflection, signals, settings."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from budgetwarden.app._config import Settings
from budgetwarden_client import BudgetClient, pb

from support import SERVE_DEADLINE_ENV, TEST_RPC_TIMEOUT_S, RunningSidecar, free_port, wait_for_exit

pytestmark = pytest.mark.slow

SERVICE = "budgetwarden.v1.BudgetService"
READY_TIMEOUT = 120.0  # a bound on waiting for a start, not a pace: a loaded machine may take long
EXIT_TIMEOUT = 120.0
EMBEDDED_STARTED = "embedded Redis-compatible server started"


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any BUDGETWARDEN_* variable, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BUDGETWARDEN_")}
    env.update(extra)
    return env


def health_status(addr: str, service: str = "", timeout: float = 1.0) -> int:
    with grpc.insecure_channel(addr) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    status: int = answer.status
    return status


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            return False
        return True


def process_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


@dataclass
class Served:
    """One ``budgetwarden serve`` child process; its stderr (the JSON log) goes to a file."""

    proc: subprocess.Popen[bytes]
    stderr_path: Path
    addr: str | None = None
    _stderr_file: Any = field(default=None, repr=False)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def logs(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.stderr().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    entries.append(json.loads(line))
        return entries

    def log(self, message: str) -> dict[str, Any]:
        """The first log line with this message, waited for: health answers SERVING a moment before `serve` logs
        that it serves, and a busy machine can stretch that moment."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            found = [entry for entry in self.logs() if entry.get("message") == message]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no {message!r} log line within {READY_TIMEOUT}s in:\n{self.stderr()}"
            time.sleep(0.05)

    def embedded_pid(self) -> int | None:
        found = [entry for entry in self.logs() if entry.get("message") == EMBEDDED_STARTED]
        return int(found[0]["pid"]) if found else None

    def wait_ready(self, addr: str | None = None) -> str:
        """Poll the health service until it answers SERVING; fail early if the process exits."""
        addr = addr or self.addr
        assert addr is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            code = self.proc.poll()
            assert code is None, f"serve exited with {code} before serving:\n{self.stderr()}"
            with contextlib.suppress(grpc.RpcError):
                if health_status(addr, timeout=0.5) == health_pb2.HealthCheckResponse.SERVING:
                    return addr
            assert time.monotonic() < deadline, f"{addr} did not serve within {READY_TIMEOUT}s:\n{self.stderr()}"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.wait()

    def wait(self) -> int:
        return wait_for_exit(self.proc, EXIT_TIMEOUT, self.stderr)


ServeFactory = Callable[..., Served]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeFactory]:
    """Start ``budgetwarden serve`` children; whatever is still running at teardown is killed (and its Valkey)."""
    started: list[Served] = []

    def start(*args: str | Path, env: dict[str, str] | None = None, addr: str | None = None) -> Served:
        stderr_path = tmp_path / f"serve-{len(started)}.stderr"
        stderr_file = stderr_path.open("wb")
        environ = dict(env if env is not None else clean_env())
        # A busy machine may miss the production deadlines: a fail-mode answer would fail a test not asking for one.
        for name, value in SERVE_DEADLINE_ENV.items():
            environ.setdefault(name, value)
        proc = subprocess.Popen(
            [sys.executable, "-m", "budgetwarden", "serve", *map(str, args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
            env=environ,
            cwd=tmp_path,
        )
        served = Served(proc, stderr_path, addr, stderr_file)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait(10)
        pid = served.embedded_pid()
        if pid is not None and process_running(pid):
            os.kill(pid, signal.SIGKILL)
        served._stderr_file.close()


def run_serve(*args: str | Path, env: dict[str, str] | None = None, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``serve`` expecting it to fail at start-up; returns its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "budgetwarden", "serve", *map(str, args)],
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        cwd=cwd,
        timeout=60,
        check=False,
    )


def task_scope(client: BudgetClient, tenant: str, task: str) -> pb.ScopeState:
    answer = client.get_budget(tenant_id=tenant, task_id=task)
    (found,) = [scope for scope in answer.scopes if scope.name == "task"]
    return found


def assert_embedded_gone(served: Served, pid: int, url: str) -> None:
    assert not process_running(pid), f"embedded server {pid} still runs after serve exited"
    assert not redis_answers(url), f"something still answers on {url}"
    if url.startswith("unix://"):
        assert not Path(url.removeprefix("unix://")).exists()


# --- embedded default, persistence, clean exit --------------------------------------------------------------------


def test_embedded_serve_persists_counters_across_a_restart(serve: ServeFactory, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    addr = f"127.0.0.1:{free_port()}"
    first = serve("--data-dir", data_dir, "--listen", addr, addr=addr)
    first.wait_ready()

    with BudgetClient(addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        checked = client.check(tenant_id="acme", task_id="persist", step_id="s1", estimated_input_tokens=100)
        assert checked.decision == pb.DECISION_ALLOW
        record = pb.UsageRecord(tenant_id="acme", task_id="persist", step_id="s1", input_tokens=50, output_tokens=10)
        (applied,) = client.report([record]).results
        assert applied.status == pb.REPORT_STATUS_APPLIED
        held = client.check(tenant_id="acme", task_id="persist", step_id="s2", estimated_input_tokens=25)
        assert held.decision == pb.DECISION_ALLOW
        before = task_scope(client, "acme", "persist")
    assert (before.used_tokens, before.reserved_tokens) == (60, 25)

    started = first.log(EMBEDDED_STARTED)
    pid, url = int(started["pid"]), str(started["url"])
    assert url.startswith("unix://"), url
    assert str(data_dir.resolve()) in url, url
    assert process_running(pid)

    assert first.stop(signal.SIGTERM) == 0, first.stderr()
    assert "Traceback" not in first.stderr()
    assert first.log("stopped")
    assert_embedded_gone(first, pid, url)
    assert not listening(int(addr.rpartition(":")[2]))

    second_addr = f"127.0.0.1:{free_port()}"
    second = serve("--data-dir", data_dir, "--listen", second_addr, addr=second_addr)
    second.wait_ready()
    with BudgetClient(second_addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        after = task_scope(client, "acme", "persist")
        view = client.get_budget(tenant_id="acme", task_id="persist")
        (again,) = client.report([record]).results
        replay = client.check(tenant_id="acme", task_id="persist", step_id="s2", estimated_input_tokens=25)
    assert (after.used_tokens, after.reserved_tokens) == (60, 25)
    assert view.task_known
    assert view.active_reservations == 1
    assert again.status == pb.REPORT_STATUS_DUPLICATE, "the report's idempotency key did not survive the restart"
    assert replay.replayed
    assert replay.reservation_id == held.reservation_id

    second_pid = second.embedded_pid()
    assert second_pid is not None
    assert second_pid != pid
    assert second.stop(signal.SIGTERM) == 0, second.stderr()
    assert_embedded_gone(second, second_pid, str(second.log(EMBEDDED_STARTED)["url"]))


def test_sigint_stops_cleanly(serve: ServeFactory, tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    served = serve("--data-dir", tmp_path / "data", "--listen", addr, addr=addr)
    served.wait_ready()
    with BudgetClient(addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        assert client.check(tenant_id="a", task_id="t", step_id="s", estimated_input_tokens=1).granted_tokens == 1
    started = served.log(EMBEDDED_STARTED)

    assert served.stop(signal.SIGINT) == 0, served.stderr()

    assert "Traceback" not in served.stderr()
    assert "KeyboardInterrupt" not in served.stderr()
    assert served.log("stopped")
    assert_embedded_gone(served, int(started["pid"]), str(started["url"]))


# --- health and reflection ----------------------------------------------------------------------------------------


def test_health_and_reflection(serve: ServeFactory, tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    served = serve("--data-dir", tmp_path / "data", "--listen", addr, addr=addr)
    served.wait_ready()

    assert health_status(addr, "") == health_pb2.HealthCheckResponse.SERVING
    assert health_status(addr, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as unknown:
        health_status(addr, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    with grpc.insecure_channel(addr) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    services = {service.name for service in listed.list_services_response.service}
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    assert described.HasField("file_descriptor_response"), described
    assert described.file_descriptor_response.file_descriptor_proto

    assert served.stop() == 0, served.stderr()


# --- graceful shutdown --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    step: str
    code: grpc.StatusCode
    granted: int
    decision: int
    after_sigterm: bool


def test_sigterm_during_a_stream_of_checks_loses_nothing(serve: ServeFactory, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    addr = f"127.0.0.1:{free_port()}"
    served = serve("--data-dir", data_dir, "--listen", addr, addr=addr)
    served.wait_ready()

    outcomes: list[Outcome] = []
    lock = threading.Lock()
    shutting_down = threading.Event()
    deadline = time.monotonic() + 60

    def worker(n: int) -> None:
        errors_after = 0
        with BudgetClient(addr, timeout=20) as client:
            for i in range(1_000_000):
                if errors_after >= 3 or time.monotonic() > deadline:
                    return
                step = f"w{n}-{i}"
                after = shutting_down.is_set()
                try:
                    answer = client.check(tenant_id="acme", task_id="stream", step_id=step, estimated_input_tokens=10)
                except grpc.RpcError as exc:
                    outcome = Outcome(step, exc.code(), 0, 0, after or shutting_down.is_set())
                    errors_after += outcome.after_sigterm
                else:
                    outcome = Outcome(step, grpc.StatusCode.OK, answer.granted_tokens, answer.decision, after)
                with lock:
                    outcomes.append(outcome)

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(4)]
    for thread in threads:
        thread.start()
    wait_until = time.monotonic() + 30
    while True:
        with lock:
            if len(outcomes) >= 200:
                break
        assert time.monotonic() < wait_until, "the checks did not get going"
        time.sleep(0.01)
    shutting_down.set()
    served.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(EXIT_TIMEOUT)
        assert not thread.is_alive()
    assert served.wait() == 0, served.stderr()
    assert "Traceback" not in served.stderr()

    before = [o for o in outcomes if not o.after_sigterm]
    failed_before = [o for o in before if o.code != grpc.StatusCode.OK]
    assert not failed_before, failed_before[:5]
    failed = [o for o in outcomes if o.code != grpc.StatusCode.OK]
    assert failed, "no call failed after the server stopped: the workers never noticed the shutdown"
    unexpected = [o for o in failed if o.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)]
    assert not unexpected, unexpected[:5]
    ok = [o for o in outcomes if o.code == grpc.StatusCode.OK]
    assert all(o.decision == pb.DECISION_ALLOW and o.granted == 10 for o in ok)
    assert len({o.step for o in ok}) == len(ok)

    # A fresh sidecar on the same data dir sees exactly the reservations that were answered OK.
    fresh_addr = f"127.0.0.1:{free_port()}"
    fresh = serve("--data-dir", data_dir, "--listen", fresh_addr, addr=fresh_addr)
    fresh.wait_ready()
    with BudgetClient(fresh_addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        view = client.get_budget(tenant_id="acme", task_id="stream")
        (task,) = [scope for scope in view.scopes if scope.name == "task"]
        assert task.reserved_tokens == 10 * len(ok)
        assert view.active_reservations == len(ok)
        for o in ok[:: max(1, len(ok) // 50)]:
            replay = client.check(tenant_id="acme", task_id="stream", step_id=o.step, estimated_input_tokens=10)
            assert replay.replayed, o.step
    assert fresh.stop() == 0, fresh.stderr()


# --- configuration ------------------------------------------------------------------------------------------------


def test_flags_win_over_env_which_wins_over_the_config_file(serve: ServeFactory, tmp_path: Path) -> None:
    file_port, env_port, flag_port = free_port(), free_port(), free_port()
    file_data = tmp_path / "from-file"
    config = tmp_path / "config.yaml"
    config.write_text(f"listen: 127.0.0.1:{file_port}\ndata_dir: {file_data}\nlog_format: json\n")

    def only_listening(port: int) -> None:
        for other in (file_port, env_port, flag_port):
            assert listening(other) == (other == port), f"port {other} (expected only {port})"

    # The config file alone.
    served = serve("--config", config)
    served.wait_ready(f"127.0.0.1:{file_port}")
    only_listening(file_port)
    assert served.log("serving")["port"] == file_port
    assert str(file_data.resolve()) in served.log(EMBEDDED_STARTED)["url"]
    assert served.stop() == 0, served.stderr()

    # The file named by BUDGETWARDEN_CONFIG.
    served = serve(env=clean_env(BUDGETWARDEN_CONFIG=str(config)))
    served.wait_ready(f"127.0.0.1:{file_port}")
    only_listening(file_port)
    assert served.stop() == 0, served.stderr()

    # The environment over the file; the file still supplies what the environment does not set.
    served = serve("--config", config, env=clean_env(BUDGETWARDEN_LISTEN=f"127.0.0.1:{env_port}"))
    served.wait_ready(f"127.0.0.1:{env_port}")
    only_listening(env_port)
    assert str(file_data.resolve()) in served.log(EMBEDDED_STARTED)["url"]
    assert served.stop() == 0, served.stderr()

    # A flag over both.
    served = serve(
        "--config", config, "--listen", f"127.0.0.1:{flag_port}",
        env=clean_env(BUDGETWARDEN_LISTEN=f"127.0.0.1:{env_port}"),
    )  # fmt: skip
    served.wait_ready(f"127.0.0.1:{flag_port}")
    only_listening(flag_port)
    assert served.log("serving")["port"] == flag_port
    assert str(file_data.resolve()) in served.log(EMBEDDED_STARTED)["url"]
    assert served.stop() == 0, served.stderr()


def test_env_wins_over_the_file_for_other_settings_too(serve: ServeFactory, tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    config = tmp_path / "config.yaml"
    config.write_text("log_format: json\nlog_level: ERROR\n")

    served = serve(
        "--config", config, "--listen", addr, "--data-dir", tmp_path / "data",
        env=clean_env(BUDGETWARDEN_LOG_LEVEL="INFO"),
    )  # fmt: skip
    served.wait_ready(addr)
    assert served.stop() == 0, served.stderr()

    # At ERROR (the file) nothing would be logged; at INFO (the environment) start and stop are.
    assert served.log("serving")["level"] == "info"
    assert served.log("stopped")


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_missing_config_file_is_an_error(serve: ServeFactory, tmp_path: Path) -> None:
    # A --config that names no file must not silently start with the defaults (e.g. embedded Redis in production).
    missing = tmp_path / "no-such-config.yaml"
    addr = f"127.0.0.1:{free_port()}"
    served = serve("--config", missing, "--listen", addr, "--data-dir", tmp_path / "data", addr=addr)

    deadline = time.monotonic() + READY_TIMEOUT
    while served.proc.poll() is None and not listening(int(addr.rpartition(":")[2])):
        assert time.monotonic() < deadline, "serve neither failed nor served"
        time.sleep(0.05)
    assert served.proc.poll() is not None, "serve started although its --config file does not exist"
    assert served.proc.returncode != 0
    stderr = served.stderr()
    assert "Traceback" not in stderr, stderr
    assert str(missing) in stderr


def test_bad_policy_file_stops_serve_with_file_line_and_field(tmp_path: Path) -> None:
    policy = tmp_path / "bad.yaml"
    policy.write_text("version: 1\ntask_types:\n  research:\n    per_step:\n      tokens: -3\n")
    addr = f"127.0.0.1:{free_port()}"

    result = run_serve("--policy-file", policy, "--listen", addr, "--data-dir", tmp_path / "data", cwd=tmp_path)

    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith(f"{policy}:5: task_types.research.per_step.tokens: "), line
    assert not listening(int(addr.rpartition(":")[2]))


def test_serve_with_a_good_policy_file_uses_it(serve: ServeFactory, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndefault_task_type: small\ntask_types:\n  small:\n    per_step: {tokens: 50}\n")
    addr = f"127.0.0.1:{free_port()}"
    served = serve("--policy-file", policy, "--listen", addr, "--data-dir", tmp_path / "data", addr=addr)
    served.wait_ready()

    with BudgetClient(addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        fits = client.check(tenant_id="a", task_id="t", step_id="s1", estimated_input_tokens=50)
        too_big = client.check(tenant_id="a", task_id="t", step_id="s2", estimated_input_tokens=51)
    assert fits.decision == pb.DECISION_ALLOW
    assert too_big.decision == pb.DECISION_DENY
    assert too_big.reason == pb.REASON_STEP_CAP_EXCEEDED
    assert served.log("serving")["policy"] == str(policy)
    assert served.stop() == 0, served.stderr()


def test_listen_address_in_use_is_one_line_and_stops_the_embedded_server(serve: ServeFactory, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        served = serve("--listen", f"127.0.0.1:{port}", "--data-dir", tmp_path / "data")
        code = served.wait()

    stderr = served.stderr()
    assert code == 1, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("budgetwarden serve: error: ")]
    assert len(errors) == 1, stderr
    assert f"127.0.0.1:{port}" in errors[0]
    started = served.log(EMBEDDED_STARTED)
    assert_embedded_gone(served, int(started["pid"]), str(started["url"]))


def test_a_second_sidecar_on_a_port_a_sidecar_serves_is_refused(
    start_sidecar: Callable[..., RunningSidecar], redis_url: str
) -> None:
    """gRPC would share a port between processes (SO_REUSEPORT) and split the calls between two sidecars, which may
    have different policies or stores; the sidecar turns that off, so the second one fails to start instead."""
    first = start_sidecar()
    second = RunningSidecar(Settings(listen=first.addr, redis_url=redis_url, log_format="text"))
    try:
        with pytest.raises(OSError, match=f"cannot listen on {first.addr}"):
            second.start()
    finally:
        second.stop()
    with BudgetClient(first.addr, timeout=TEST_RPC_TIMEOUT_S) as client:  # the first one still serves
        answer = client.check(tenant_id="default", task_id="t", step_id="s", estimated_input_tokens=1)
        assert answer.decision == pb.DECISION_ALLOW
