"""The policy engine where it needs a process of its own: prompts are counted with networking disabled (and loading
an encoding writes nothing), and ``budgetwarden serve`` reloads its policy on SIGHUP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from budgetwarden.store._embedded import free_port
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import BudgetClient

POLICY = """
unknown_tenants: reject
tenants:
  acme:
    windows:
      day: {tokens: 1000000, usd: 100}
models:
  big: {input_usd_per_mtok: 10, cached_input_usd_per_mtok: 2.5, output_usd_per_mtok: 30, degrade_to: small}
  small: {input_usd_per_mtok: 1, cached_input_usd_per_mtok: 0.5, output_usd_per_mtok: 4}
  counted: {encoding: cl100k_base}
  newer: {encoding: o200k_base}
default_task_type: agent
task_types:
  agent:
    per_task: {tokens: 10000}
    per_step: {tokens: 4000}
    soft_threshold: 0.5
    checkpoint_threshold: 0.8
    degrade:
      - {name: cheaper, model: cheaper, max_output_tokens: 500}
  plain:
    per_task: {tokens: 1000000}
"""


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def check(client: BudgetClient, step: str, tokens: int, **fields: Any) -> pb.CheckResponse:
    values: dict[str, Any] = {"tenant_id": "acme", "task_id": "t1", "step_id": step, "model": "big"}
    values |= {"estimated_input_tokens": tokens} | fields
    answer = client.check(**values)
    assert not answer.from_fail_mode, answer  # decided by the store, as every test here assumes
    return answer


def test_counting_works_with_networking_disabled(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import socket
        def refuse(*args, **kwargs):
            raise OSError("networking is disabled in this test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        from budgetwarden.domain._tokens import TokenCounter
        counter = TokenCounter()
        exact = counter.count_text("hello offline world", "cl100k_base")
        approximate = counter.count_text("hello offline world", "o200k_base")
        print(exact.tokens, exact.exact, approximate.tokens, approximate.exact)
        """
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "True", "3", "False"]
    assert not (tmp_path / "empty-cache").exists()  # loading an encoding writes nothing (a read-only image works)


def test_sighup_reloads_the_policy(tmp_path: Path, policy_file: Path, redis_url: str) -> None:
    port = free_port()
    args = [sys.executable, "-m", "budgetwarden", "serve", "--listen", f"127.0.0.1:{port}", "--redis-url", redis_url]
    args += ["--policy-file", str(policy_file), "--policy-reload-seconds", "0", "--check-deadline-ms", "30000"]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    try:
        with BudgetClient(f"127.0.0.1:{port}", timeout=10) as c:
            deadline = time.monotonic() + 60
            while True:
                try:
                    before = check(c, "s1", 1, task_type="plain")
                    break
                except grpc.RpcError:
                    assert process.poll() is None, "serve exited"
                    assert time.monotonic() < deadline, "serve did not start"
                    time.sleep(0.1)
            policy_file.write_text(POLICY + "\n# a change\n")
            time.sleep(0.2)
            assert check(c, "s2", 1, task_type="plain").policy_version == before.policy_version  # no polling
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while check(c, "s3", 1, task_type="plain").policy_version == before.policy_version:
                assert time.monotonic() < deadline, "SIGHUP did not reload the policy"
                time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(20)
