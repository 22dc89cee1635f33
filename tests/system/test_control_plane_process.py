"""``budgetwarden control-plane`` as a real process (issue 14): it serves the admin API with credentials, health and
reflection against the Redis the sidecars use, and no budget API; a checkpoint a sidecar opened is listed and approved
through it, and the task goes on. Without a tokens file it refuses a listener beyond loopback, in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_api.v1 import budget_pb2_grpc

from support import RunningSidecar, free_port, run_cli, wait_for_exit
from support_admin import TWO_TENANTS_POLICY, TokensFile, open_checkpoint

pytestmark = pytest.mark.slow

ADMIN_SERVICE = "budgetwarden.v1.BudgetAdminService"
READY_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0


def clean_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("BUDGETWARDEN_")}


def serving(addr: str, service: str) -> bool:
    try:
        with grpc.insecure_channel(addr) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
    except grpc.RpcError:
        return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def services(addr: str) -> set[str]:
    with grpc.insecure_channel(addr) as channel:
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]), timeout=30)
    return {service.name for service in answer.list_services_response.service}


@pytest.fixture
def control_plane(tmp_path: Path, redis_url: str) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(*flags: str) -> subprocess.Popen[str]:
        command = [sys.executable, "-m", "budgetwarden", "control-plane", "--redis-url", redis_url, *flags]
        log = (tmp_path / f"control-plane-{len(started)}.log").open("w")
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=clean_env())
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(EXIT_TIMEOUT_S)


def test_the_control_plane_lists_and_approves_what_a_sidecar_opened(
    tmp_path: Path, control_plane: Callable[..., subprocess.Popen[str]], start_sidecar: Callable[..., RunningSidecar]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(TWO_TENANTS_POLICY)
    tokens = TokensFile(tmp_path / "tokens.json")
    alice = tokens.add("alice", "approver", ["acme"])
    sidecar = start_sidecar(policy_file=policy)  # the data plane: no admin listener
    addr = f"127.0.0.1:{free_port()}"
    proc = control_plane(
        "--admin-listen", addr, "--admin-tokens-file", str(tokens.path), "--policy-file", str(policy),
        "--log-format", "text",
    )  # fmt: skip
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not (serving(addr, "") and serving(addr, ADMIN_SERVICE)):
        assert proc.poll() is None, (tmp_path / "control-plane-0.log").read_text()
        assert time.monotonic() < deadline, "the control plane did not become ready"
        time.sleep(0.05)
    assert ADMIN_SERVICE in services(addr)
    assert "budgetwarden.v1.BudgetService" not in services(addr)

    checkpoint = open_checkpoint(sidecar.addr, "acme", "waiting-task")
    env = {"BUDGETWARDEN_ADMIN_TOKEN": alice}
    listed = run_cli("checkpoints", "list", "--tenant", "acme", "--admin-addr", addr, env=env)
    assert listed.returncode == 0, listed.stderr
    assert checkpoint in listed.stdout
    anonymous = run_cli("approve", checkpoint, "--add", "1000", "--admin-addr", addr)
    assert anonymous.returncode == 1
    approved = run_cli("approve", checkpoint, "--add", "1000", "--admin-addr", addr, env=env)
    assert approved.returncode == 0, approved.stderr

    with grpc.insecure_channel(sidecar.addr) as channel:
        request = pb.CheckRequest(tenant_id="acme", task_id="waiting-task", step_id="s1", estimated_input_tokens=150)
        goes_on = budget_pb2_grpc.BudgetServiceStub(channel).Check(request, timeout=30)
    assert goes_on.decision == pb.DECISION_ALLOW

    proc.send_signal(signal.SIGTERM)
    log = tmp_path / "control-plane-0.log"
    assert wait_for_exit(proc, EXIT_TIMEOUT_S, log.read_text) == 0
    assert alice not in log.read_text()


def test_without_a_tokens_file_the_control_plane_refuses_a_wider_listener(
    tmp_path: Path, control_plane: Callable[..., subprocess.Popen[str]]
) -> None:
    proc = control_plane("--admin-listen", f"0.0.0.0:{free_port()}", "--log-format", "text")
    log = tmp_path / "control-plane-0.log"
    assert wait_for_exit(proc, EXIT_TIMEOUT_S, log.read_text) == 1
    lines = log.read_text().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("budgetwarden control-plane: error: admin_listen 0.0.0.0:")
    assert "admin_tokens_file" in lines[0]
