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

import grpc

from budgetwarden_client import BudgetClient

from support import free_port
from support_policies import ENGINE_POLICY, check_acme


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


def test_sighup_reloads_the_policy(tmp_path: Path, engine_policy_file: Path, redis_url: str) -> None:
    port = free_port()
    args = [sys.executable, "-m", "budgetwarden", "serve", "--listen", f"127.0.0.1:{port}", "--redis-url", redis_url]
    args += ["--policy-file", str(engine_policy_file), "--policy-reload-seconds", "0", "--check-deadline-ms", "30000"]
    args += ["--store-deadline-ms", "30000"]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    try:
        with BudgetClient(f"127.0.0.1:{port}", timeout=10) as c:
            deadline = time.monotonic() + 60
            while True:
                try:
                    before = check_acme(c, "s1", 1, task_type="plain")
                    break
                except grpc.RpcError:
                    assert process.poll() is None, "serve exited"
                    assert time.monotonic() < deadline, "serve did not start"
                    time.sleep(0.1)
            engine_policy_file.write_text(ENGINE_POLICY + "\n# a change\n")
            time.sleep(0.2)
            assert check_acme(c, "s2", 1, task_type="plain").policy_version == before.policy_version  # no polling
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while check_acme(c, "s3", 1, task_type="plain").policy_version == before.policy_version:
                assert time.monotonic() < deadline, "SIGHUP did not reload the policy"
                time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(20)
