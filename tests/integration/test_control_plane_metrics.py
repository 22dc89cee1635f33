"""The control plane's own metrics (issue 14): admin calls by call and outcome (refusals included, whichever way in:
gRPC or the console) and its notification deliveries, on its --metrics-port scrape endpoint. A real control plane on
the test's loop, a real sidecar and Valkey, a real receiver; scraped over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from budgetwarden.app._control_plane import ControlPlane
from budgetwarden.limiter import wall_clock_ms
from budgetwarden_api.v1 import admin_pb2 as admin_pb

from support import RunningSidecar, free_port, sidecar_settings
from support_admin import TWO_TENANTS_POLICY, Admin, TokensFile, open_checkpoint
from support_notify import Receiver

SECRET = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGhlLXRlc3Rz"
ADMIN_CALLS = "budgetwarden_admin_calls_total"


def samples(port: int) -> list[Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def admin_calls(port: int) -> dict[tuple[str, str, str], float]:
    """The admin call counter's series: (call, outcome, via) -> count."""
    found = {}
    for sample in samples(port):
        if sample.name == ADMIN_CALLS:
            rpc, outcome, via = (sample.labels[f"budgetwarden_admin_{name}"] for name in ("rpc", "outcome", "via"))
            found[(rpc, outcome, via)] = sample.value
    return found


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver().start()
    yield started
    started.stop()


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(TWO_TENANTS_POLICY)
    return path


@contextlib.asynccontextmanager
async def running_plane(
    tmp_path: Path, redis_url: str, receiver: Receiver, policy_file: Path
) -> AsyncIterator[tuple[ControlPlane, TokensFile, int]]:
    """A control plane on the test's own loop (its gRPC server belongs to that loop: started and stopped there)."""
    secret = tmp_path / "notify-secret"
    secret.write_text(SECRET)
    tokens = TokensFile(tmp_path / "tokens.yaml")
    metrics_port = free_port()
    settings = sidecar_settings(
        redis_url,
        policy_file=policy_file,
        admin_listen=f"127.0.0.1:{free_port()}",
        admin_tokens_file=tokens.path,
        metrics_port=metrics_port,
        notify_webhook_urls=receiver.url,
        notify_secret_file=secret,
    )
    started = ControlPlane(settings, clock=wall_clock_ms)
    await started.start()
    try:
        yield started, tokens, metrics_port
    finally:
        await started.stop()


async def test_admin_calls_are_counted_by_call_and_outcome_and_deliveries_too(
    tmp_path: Path,
    redis_url: str,
    start_sidecar: Callable[..., RunningSidecar],
    policy_file: Path,
    receiver: Receiver,
) -> None:
    async with running_plane(tmp_path, redis_url, receiver, policy_file) as (control, tokens, metrics_port):
        await _count_calls_and_deliveries(control, tokens, metrics_port, start_sidecar, policy_file, receiver)


async def _count_calls_and_deliveries(
    control: ControlPlane,
    tokens: TokensFile,
    metrics_port: int,
    start_sidecar: Callable[..., RunningSidecar],
    policy_file: Path,
    receiver: Receiver,
) -> None:
    sidecar = start_sidecar(policy_file=policy_file)
    approver = tokens.add("alice", "approver", ["acme"])
    checkpoint = await asyncio.to_thread(open_checkpoint, sidecar.addr, "acme", "counted")
    addr = control.settings.admin_listen or ""

    def calls() -> list[grpc.StatusCode]:
        with grpc.insecure_channel(addr) as channel:
            alice, nobody = Admin(channel, approver), Admin(channel)
            approve = admin_pb.ApproveCheckpointRequest(checkpoint_id=checkpoint, add_tokens=50)
            return [
                alice.code("ApproveCheckpoint", approve),
                alice.code("GetTenantWindows", admin_pb.GetTenantWindowsRequest(tenant_id="globex")),
                nobody.code("ListCheckpoints", admin_pb.ListCheckpointsRequest(tenant_id="acme")),
                alice.code("ListCheckpoints", admin_pb.ListCheckpointsRequest(tenant_id="")),
            ]

    assert await asyncio.to_thread(calls) == [
        grpc.StatusCode.OK,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
    ]
    expected = {
        ("ApproveCheckpoint", "OK", "grpc"): 1,
        ("GetTenantWindows", "PERMISSION_DENIED", "grpc"): 1,
        ("ListCheckpoints", "UNAUTHENTICATED", "grpc"): 1,
        ("ListCheckpoints", "INVALID_ARGUMENT", "grpc"): 1,
    }
    # A refused call is counted as its handler ends, just after its status went out: the client can see the status
    # first, so the count is waited for (and must then be exactly this). Scraped from a thread: the endpoint answers
    # on this loop.
    seen: list[dict[tuple[str, str, str], float]] = []

    def counted() -> bool:
        seen.append(admin_calls(metrics_port))
        return len(seen[-1]) >= len(expected)

    await asyncio.to_thread(_wait_until, counted)
    assert seen[-1] == expected
    # The opened and the approved checkpoint, delivered by the control plane and counted on its endpoint (the
    # deliverer's meter is the control plane's provider, not the SDK's global no-op one).
    await asyncio.to_thread(receiver.wait_for, lambda r: len(r.events()) == 2)

    def delivered() -> float:
        return sum(s.value for s in samples(metrics_port) if s.name == "budgetwarden_notify_delivered_total")

    await asyncio.to_thread(_wait_until, lambda: delivered() == 2)


def _wait_until(condition: Callable[[], bool], bound_s: float = 60.0) -> None:
    """Polls ``condition`` (the deliverer counts an event just after the receiver has it) within a generous bound."""
    give_up = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < give_up, "the condition did not hold within the bound"
        time.sleep(0.05)
