"""Overload (issue 16), fairness between connections: --max-streams-per-connection is HTTP/2's
SETTINGS_MAX_CONCURRENT_STREAMS, enforced by gRPC's C core. A client with that many calls open on a connection holds its
next ones back itself (gRPC queues them in the channel) instead of sending them, so the sidecar spends nothing on them,
and another connection still gets its calls in.

Over a real socket, with the store frozen (SIGSTOP) so every check that reaches the sidecar stays in flight: one
channel opens 4 checks and only 2 reach the sidecar; a second channel (its own connection) gets its check in beside
them; once the store answers again, all of them are decided, the held-back ones too."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from budgetwarden.store._embedded import EmbeddedRedis
from budgetwarden.transport._admission import Admission
from budgetwarden_api.v1 import budget_pb2 as pb

from support import RunningSidecar, free_port, wait_until
from support_faults import RedisFaults

CHECK = "/budgetwarden.v1.BudgetService/Check"
RPC_TIMEOUT_S = 120.0  # the client's deadline: far beyond anything the test waits for
HOLD_MS = 60_000  # checks wait for the frozen store this long at most (the test thaws it long before)
STREAMS = 2
# A channel of its own subchannel pool opens its own connection: gRPC otherwise shares one between channels to the
# same address with the same options.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A store of this test's own: it is frozen (SIGSTOP) for a while, which the session's shared one must not be."""
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), persistent=False)
    server.start()
    yield server
    RedisFaults(server).resume()  # harmless when it runs; a failed test must not leave it frozen
    server.stop()


def checks(channel: grpc.Channel, tenant: str, count: int) -> list[grpc.Future]:
    call = channel.unary_unary(CHECK, pb.CheckRequest.SerializeToString, pb.CheckResponse.FromString)
    return [
        call.future(
            pb.CheckRequest(tenant_id=tenant, task_id="t", step_id=f"s{n}", estimated_input_tokens=10),
            timeout=RPC_TIMEOUT_S,
        )
        for n in range(count)
    ]


def admission_of(running: RunningSidecar) -> Admission:
    assert running.sidecar is not None
    assert running.sidecar.servicer is not None
    return running.sidecar.servicer.admission


def test_one_connection_gets_at_most_its_streams_in_and_another_connection_still_gets_in(
    start_sidecar: Callable[..., RunningSidecar], store: EmbeddedRedis
) -> None:
    running = start_sidecar(
        redis_url=store.url,
        max_streams_per_connection=STREAMS,
        check_deadline_ms=HOLD_MS,
        store_deadline_ms=HOLD_MS,
        shutdown_grace_seconds=0,
    )
    admission = admission_of(running)
    faults = RedisFaults(store)
    with (
        grpc.insecure_channel(running.addr, options=OWN_CONNECTION) as noisy_channel,
        grpc.insecure_channel(running.addr, options=OWN_CONNECTION) as quiet_channel,
    ):
        # One answered check per connection first: the client has then read the sidecar's SETTINGS (its stream bound).
        # Streams opened before that may go past the bound and come back REFUSED_STREAM (UNAVAILABLE), which happened
        # once on a busy machine.
        for channel, tenant in ((noisy_channel, "noisy"), (quiet_channel, "quiet")):
            call = channel.unary_unary(CHECK, pb.CheckRequest.SerializeToString, pb.CheckResponse.FromString)
            warm = pb.CheckRequest(tenant_id=tenant, task_id="warm", step_id="s", estimated_input_tokens=10)
            assert call(warm, timeout=RPC_TIMEOUT_S).decision == pb.DECISION_ALLOW
        assert admission.in_flight == 0
        faults.stop()
        noisy = checks(noisy_channel, "noisy", 4)
        wait_until(lambda: admission.by_tenant["noisy"] >= STREAMS, "the noisy connection's checks are in flight")
        # Another connection, opened after the noisy one sent all it could: its check reaches the sidecar beside
        # them. Without the bound all 4 noisy checks would have been in flight long before this one arrived.
        quiet = checks(quiet_channel, "quiet", 1)
        wait_until(lambda: admission.by_tenant["quiet"] == 1, "the quiet connection's check is in flight")
        assert admission.by_tenant["noisy"] == STREAMS, "the noisy connection had more checks open than its streams"
        assert admission.in_flight == STREAMS + 1
        assert not any(c.done() for c in noisy + quiet)  # all wait: 2 in the sidecar, 2 in the noisy client

        faults.resume()
        answers = [c.result(RPC_TIMEOUT_S) for c in noisy + quiet]
        assert [a.decision for a in answers] == [pb.DECISION_ALLOW] * 5  # the held-back ones sent once a stream freed
        assert admission.in_flight == 0
