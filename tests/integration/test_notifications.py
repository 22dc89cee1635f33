"""Notifications (issue 14): checkpoints opened and decided, and tenant windows crossing notified fractions, written
to the tenant's notification stream by the scripts that make them happen and delivered by the control plane's
deliverer as signed CloudEvents (and Slack text) to a real HTTP receiver on localhost, with retries and backoff.
Real sidecar, real Valkey; the deliverer runs on the test's loop, polled by the test (no timing)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from redis.asyncio import Redis as AsyncRedis

from budgetwarden.notify import Backoff, Deliverer, Target, read_secret, verify
from budgetwarden.store import NotificationQueue, TenantKeys
from budgetwarden_api.v1 import admin_pb2 as admin_pb
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_api.v1 import budget_pb2_grpc

from support import AnswersWhenCancelled, RunningSidecar, free_port
from support_admin import RPC_TIMEOUT_S, TWO_TENANTS_POLICY, Admin, open_checkpoint
from support_notify import WAIT_S, Receiver, deliver_all

SECRET = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGhlLXRlc3Rz"  # base64 of "secret-key-for-the-tests"

WINDOW_POLICY = """
unknown_tenants: reject
tenants:
  acme:
    windows:
      day: {tokens: 1000}
models:
  small: {input_usd_per_mtok: 1, output_usd_per_mtok: 4}
default_task_type: work
task_types:
  work:
    per_task: {tokens: 100000}
"""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver().start()
    yield started
    started.stop()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "notify-secret"
    path.write_text(SECRET + "\n")
    return path


@pytest.fixture
def running(tmp_path: Path, start_sidecar: Callable[..., RunningSidecar]) -> RunningSidecar:
    policy = tmp_path / "policy.yaml"
    policy.write_text(TWO_TENANTS_POLICY)
    return start_sidecar(policy_file=policy, admin_listen=f"127.0.0.1:{free_port()}")


class Sleeps:
    """The deliverer's backoff waits, recorded; each runs ``on_wait`` (a test's hook) instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.on_wait: Callable[[int], None] = lambda n: None

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.on_wait(len(self.delays))
        await asyncio.sleep(0)


@pytest.fixture
async def make_deliverer(async_redis: AsyncRedis, secret_file: Path) -> AsyncIterator[Callable[..., Deliverer]]:
    made: list[Deliverer] = []

    def make(targets: list[Target], *, consumer: str = "test", **options: Any) -> Deliverer:
        values: dict[str, Any] = {
            "source": "/budgetwarden/test",
            "secret_file": secret_file,
            "max_attempts": 5,
            "backoff": Backoff(0.01, 0.04, jitter=False),
            "timeout_s": WAIT_S,
            "rescan_interval_s": 0,
        }
        values.update(options)
        deliverer = Deliverer(NotificationQueue(async_redis, consumer), targets, **values)
        made.append(deliverer)
        return deliverer

    yield make
    for deliverer in made:
        await deliverer.aclose()


def check(addr: str, tenant: str, task: str, step: str, tokens: int) -> pb.CheckResponse:
    request = pb.CheckRequest(tenant_id=tenant, task_id=task, step_id=step, estimated_input_tokens=tokens)
    with grpc.insecure_channel(addr) as channel:
        return budget_pb2_grpc.BudgetServiceStub(channel).Check(request, timeout=RPC_TIMEOUT_S)  # type: ignore[no-any-return]


async def test_checkpoint_opened_and_approved_arrive_as_signed_cloud_events_and_slack_text(
    running: RunningSidecar,
    receiver: Receiver,
    secret_file: Path,
    make_deliverer: Callable[..., Deliverer],
    async_redis: AsyncRedis,
) -> None:
    slack_url = f"http://127.0.0.1:{receiver.port}/slack"
    deliverer = make_deliverer([Target(receiver.url), Target(slack_url, slack=True)])
    checkpoint = await asyncio.to_thread(open_checkpoint, running.addr, "acme", "task-1")
    await deliver_all(deliverer)

    await asyncio.to_thread(receiver.wait_for, lambda r: len(r.requests) == 2)
    (path, headers, body) = next(r for r in receiver.requests if r[0] == "/hook")
    assert path == "/hook"
    assert headers["content-type"].startswith("application/cloudevents+json")
    assert verify(read_secret(secret_file), headers, body, now_s=int(time.time()))
    assert not verify(b"another key", headers, body, now_s=int(time.time()))
    assert not verify(read_secret(secret_file), headers, body + b" ", now_s=int(time.time()))
    # A replay an hour later is refused by its timestamp.
    assert not verify(read_secret(secret_file), headers, body, now_s=int(time.time()) + 3600)
    (opened,) = receiver.events()
    assert opened["specversion"] == "1.0"
    assert opened["type"] == "io.budgetwarden.checkpoint.opened"
    assert opened["source"] == "/budgetwarden/test"
    assert opened["subject"] == "acme/task-1"
    assert opened["id"] == headers["webhook-id"]
    assert opened["time"].endswith("Z")
    assert opened["data"]["checkpoint_id"] == checkpoint
    assert opened["data"]["task"]["limit"] == 100
    slack = json.loads(next(body for p, _, body in receiver.requests if p == "/slack"))
    assert set(slack) == {"text"}
    assert checkpoint in slack["text"]

    admin = Admin(grpc.insecure_channel(running.settings.admin_listen or ""))
    request = admin_pb.ApproveCheckpointRequest(checkpoint_id=checkpoint, add_tokens=200)
    answer = await asyncio.to_thread(admin.call, "ApproveCheckpoint", request)
    assert answer.outcome == admin_pb.CHECKPOINT_OUTCOME_APPROVED
    await deliver_all(deliverer)
    await asyncio.to_thread(receiver.wait_for, lambda r: len(r.events()) == 2)
    approved = receiver.events()[1]
    assert approved["type"] == "io.budgetwarden.checkpoint.approved"
    assert approved["data"]["added_tokens"] == 200
    assert approved["data"]["task"]["limit"] == 300
    assert approved["id"] != opened["id"]
    # Delivered events leave the stream: what is left awaits delivery.
    assert await async_redis.xlen(TenantKeys("acme").prefix + "notify") == 0
    assert deliverer.counts["delivered"] == 4


async def test_a_denied_checkpoint_is_notified_with_who_denied_it(
    tmp_path: Path,
    start_sidecar: Callable[..., RunningSidecar],
    receiver: Receiver,
    make_deliverer: Callable[..., Deliverer],
) -> None:
    from support_admin import TokensFile

    policy = tmp_path / "policy.yaml"
    policy.write_text(TWO_TENANTS_POLICY)
    tokens = TokensFile(tmp_path / "tokens.json")
    token = tokens.add("alice", "approver", ["acme"])
    running = start_sidecar(policy_file=policy, admin_listen=f"127.0.0.1:{free_port()}", admin_tokens_file=tokens.path)
    deliverer = make_deliverer([Target(receiver.url)])
    checkpoint = await asyncio.to_thread(open_checkpoint, running.addr, "acme", "task-d")
    admin = Admin(grpc.insecure_channel(running.settings.admin_listen or ""), token)
    await asyncio.to_thread(admin.call, "DenyCheckpoint", admin_pb.DenyCheckpointRequest(checkpoint_id=checkpoint))
    await deliver_all(deliverer)
    await asyncio.to_thread(receiver.wait_for, lambda r: len(r.events()) == 2)
    kinds = sorted(e["type"] for e in receiver.events())
    assert kinds == ["io.budgetwarden.checkpoint.denied", "io.budgetwarden.checkpoint.opened"]
    denied = next(e for e in receiver.events() if e["type"].endswith("denied"))
    assert denied["data"]["decided_by"] == "alice"


async def test_a_window_crossing_80_percent_is_notified_once_not_per_check(
    tmp_path: Path,
    start_sidecar: Callable[..., RunningSidecar],
    receiver: Receiver,
    make_deliverer: Callable[..., Deliverer],
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(WINDOW_POLICY)
    running = start_sidecar(policy_file=policy, notify_fractions="0.8,1.0")
    deliverer = make_deliverer([Target(receiver.url)])
    for n in range(9):  # 100 tokens each: 800 (80%) at the 8th check, 900 at the 9th
        answer = await asyncio.to_thread(check, running.addr, "acme", f"t{n}", "s", 100)
        assert (answer.decision, answer.granted_tokens) == (pb.DECISION_ALLOW, 100), answer
    await deliver_all(deliverer)
    await asyncio.to_thread(receiver.wait_for, lambda r: len(r.events()) >= 1)
    (crossed,) = receiver.events()
    assert crossed["type"] == "io.budgetwarden.window.crossed"
    assert crossed["subject"] == "acme"
    data = crossed["data"]
    assert (data["unit"], data["fraction"], data["limit"]) == ("tokens", 0.8, 1000)
    assert data["used"] + data["reserved"] == 800
    assert data["window"].startswith("day:")

    # Filling the window to its limit is the 100% crossing: one more event.
    answer = await asyncio.to_thread(check, running.addr, "acme", "last", "s", 100)
    assert answer.decision == pb.DECISION_ALLOW, answer
    await deliver_all(deliverer)
    await asyncio.to_thread(receiver.wait_for, lambda r: len(r.events()) == 2)
    assert receiver.events()[1]["data"]["fraction"] == 1.0


async def test_a_hanging_receiver_delays_no_check_and_a_down_one_gets_the_events_when_back(
    running: RunningSidecar,
    receiver: Receiver,
    make_deliverer: Callable[..., Deliverer],
) -> None:
    deliverer = make_deliverer([Target(receiver.url)])
    receiver.gate.clear()  # the receiver takes requests and never answers, until the test says
    first = await asyncio.to_thread(open_checkpoint, running.addr, "acme", "hang-0")
    await deliverer.poll()
    await asyncio.to_thread(
        receiver.wait_for, lambda r: r.entered == 1
    )  # the deliverer is stuck in the POST of the first event
    # Meanwhile checks are answered, opening more checkpoints (whose events only wait in Redis).
    for n in range(1, 4):
        await asyncio.to_thread(open_checkpoint, running.addr, "acme", f"hang-{n}")
    answer = await asyncio.to_thread(check, running.addr, "globex", "free", "s", 10)
    assert answer.decision == pb.DECISION_ALLOW
    assert not receiver.requests  # nothing was answered while the checks were
    receiver.gate.set()
    await deliver_all(deliverer)
    await asyncio.to_thread(receiver.wait_for, lambda r: len(r.events()) == 4)
    assert receiver.events()[0]["data"]["checkpoint_id"] == first

    # Now the receiver is down: connections are refused, and each try is retried after a doubled wait...
    receiver.stop()
    back = Receiver(port=receiver.port)
    sleeps = Sleeps()
    sleeps.on_wait = lambda n: back.start() if n == 2 else None  # ...and it is back before the third try
    retrying = make_deliverer([Target(back.url)], consumer="retrying", sleep=sleeps)
    try:
        late = await asyncio.to_thread(open_checkpoint, running.addr, "acme", "down-0")
        await deliver_all(retrying)
        await asyncio.to_thread(back.wait_for, lambda r: len(r.events()) == 1)
        assert back.events()[0]["data"]["checkpoint_id"] == late
        assert sleeps.delays == [0.01, 0.02]
        assert retrying.counts["retried"] == 2
        assert retrying.counts["delivered"] == 1
    finally:
        back.stop()


async def test_a_receiver_that_stays_down_is_given_up_after_the_last_try_and_counted(
    running: RunningSidecar, make_deliverer: Callable[..., Deliverer], async_redis: AsyncRedis
) -> None:
    sleeps = Sleeps()
    down = Target(f"http://127.0.0.1:{free_port()}/hook")
    deliverer = make_deliverer([down], sleep=sleeps, max_attempts=4)
    await asyncio.to_thread(open_checkpoint, running.addr, "acme", "never")
    await deliver_all(deliverer)
    assert sleeps.delays == [0.01, 0.02, 0.04]  # doubled, then capped at backoff.max_s
    assert deliverer.counts["dropped_retries_exhausted"] == 1
    assert await async_redis.xlen(TenantKeys("acme").prefix + "notify") == 0


async def test_a_full_notification_stream_drops_new_events_and_counts_them(
    tmp_path: Path,
    start_sidecar: Callable[..., RunningSidecar],
    receiver: Receiver,
    make_deliverer: Callable[..., Deliverer],
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(TWO_TENANTS_POLICY)
    running = start_sidecar(policy_file=policy, notify_stream_max_len=2)
    reader = InMemoryMetricReader()
    deliverer = make_deliverer([Target(receiver.url)], meter_provider=MeterProvider(metric_readers=[reader]))
    opened = [await asyncio.to_thread(open_checkpoint, running.addr, "acme", f"full-{n}") for n in range(3)]
    await deliver_all(deliverer)
    await asyncio.to_thread(receiver.wait_for, lambda r: len(r.events()) == 2)
    # The oldest two are kept (delivered concurrently, so in any order); the third was dropped.
    assert sorted(e["data"]["checkpoint_id"] for e in receiver.events()) == sorted(opened[:2])
    assert deliverer.counts["dropped_queue_full"] == 1
    data = reader.get_metrics_data()
    assert data is not None
    points = [
        (dict(point.attributes or {}), point.value)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "budgetwarden.notify.dropped"
        for point in metric.data.data_points  # type: ignore[union-attr]
    ]
    assert points == [({"reason": "queue_full"}, 1)]
    # Taken once: a second look counts nothing more.
    await deliver_all(deliverer)
    assert deliverer.counts["dropped_queue_full"] == 1


async def test_two_replicas_deliver_each_event_once(
    running: RunningSidecar, receiver: Receiver, make_deliverer: Callable[..., Deliverer]
) -> None:
    replicas = [make_deliverer([Target(receiver.url)], consumer=name, in_flight=2) for name in ("a", "b")]
    for n in range(6):
        await asyncio.to_thread(open_checkpoint, running.addr, "acme", f"once-{n}")
    for _ in range(10):
        await asyncio.gather(*(deliverer.poll() for deliverer in replicas))
        await asyncio.gather(*(deliverer.idle() for deliverer in replicas))
    await asyncio.to_thread(receiver.wait_for, lambda r: len(r.events()) == 6)
    ids = [e["id"] for e in receiver.events()]
    assert len(set(ids)) == 6
    assert all(deliverer.counts["delivered"] > 0 for deliverer in replicas)


async def test_an_event_a_dead_replica_took_is_claimed_and_delivered_by_another(
    running: RunningSidecar,
    receiver: Receiver,
    make_deliverer: Callable[..., Deliverer],
    async_redis: AsyncRedis,
) -> None:
    await asyncio.to_thread(open_checkpoint, running.addr, "acme", "orphan")
    # A replica takes the event and dies before acknowledging it.
    dead = NotificationQueue(async_redis, "dead")
    (stream,) = await dead.streams()
    assert len(await dead.read(stream, 10)) == 1
    survivor = make_deliverer([Target(receiver.url)], consumer="survivor", claim_idle_ms=0)
    await deliver_all(survivor)
    await asyncio.to_thread(receiver.wait_for, lambda r: len(r.events()) == 1)
    assert receiver.events()[0]["subject"] == "acme/orphan"


async def test_the_control_plane_delivers_what_a_sidecar_opened_and_what_it_approved(
    running: RunningSidecar, receiver: Receiver, secret_file: Path, redis_url: str
) -> None:
    from budgetwarden.app._control_plane import ControlPlane
    from budgetwarden.limiter import wall_clock_ms

    from support import sidecar_settings

    checkpoint = await asyncio.to_thread(open_checkpoint, running.addr, "acme", "via-control-plane")
    settings = sidecar_settings(
        redis_url,
        policy_file=running.settings.policy_file,
        admin_listen=f"127.0.0.1:{free_port()}",
        notify_webhook_urls=receiver.url,
        notify_secret_file=secret_file,
    )
    plane = ControlPlane(settings, clock=wall_clock_ms)
    await plane.start()
    try:
        await asyncio.to_thread(receiver.wait_for, lambda r: len(r.events()) == 1)
        admin = Admin(grpc.insecure_channel(settings.admin_listen or ""))
        request = admin_pb.ApproveCheckpointRequest(checkpoint_id=checkpoint, add_tokens=50)
        await asyncio.to_thread(admin.call, "ApproveCheckpoint", request)
        await asyncio.to_thread(receiver.wait_for, lambda r: len(r.events()) == 2)
    finally:
        await plane.stop()
    opened, approved = receiver.events()
    assert (opened["type"], approved["type"]) == (
        "io.budgetwarden.checkpoint.opened",
        "io.budgetwarden.checkpoint.approved",
    )
    _, headers, body = receiver.requests[1]
    assert verify(read_secret(secret_file), headers, body, now_s=int(time.time()))


async def test_an_unreadable_key_file_is_retried_not_sent_unsigned(
    running: RunningSidecar, receiver: Receiver, secret_file: Path, make_deliverer: Callable[..., Deliverer]
) -> None:
    sleeps = Sleeps()
    await asyncio.to_thread(secret_file.unlink)
    sleeps.on_wait = lambda n: secret_file.write_text(SECRET) if n == 1 else None  # the Secret is back
    deliverer = make_deliverer([Target(receiver.url)], sleep=sleeps)
    await asyncio.to_thread(open_checkpoint, running.addr, "acme", "key-later")
    await deliver_all(deliverer)
    await asyncio.to_thread(receiver.wait_for, lambda r: len(r.events()) == 1)
    _, headers, body = receiver.requests[0]
    assert verify(read_secret(secret_file), headers, body, now_s=int(time.time()))
    assert deliverer.counts["retried"] == 1


async def test_a_stream_gone_since_the_scan_is_not_made_again_by_the_reader(async_redis: AsyncRedis) -> None:
    queue = NotificationQueue(async_redis, "late")
    stream = TenantKeys("gone").prefix + "notify"
    assert await queue.read(stream, 10) == []
    assert await queue.claim(stream, 0, 10) == []
    assert await async_redis.exists(stream) == 0  # a stream a reader made would never expire


async def test_the_poll_loop_stops_when_a_redis_call_consumed_its_cancellation(
    make_deliverer: Callable[..., Deliverer],
) -> None:
    # redis-py can finish a call cancelled in flight and return its answer: the loop must still end, not sleep again
    # (the control plane's shutdown waits for it).
    deliverer = make_deliverer([], poll_interval_s=0.01)
    poll = AnswersWhenCancelled(0)
    deliverer.poll = poll  # type: ignore[method-assign]
    loop = asyncio.create_task(deliverer.run())
    await poll.entered.wait()
    loop.cancel()
    done, _ = await asyncio.wait({loop}, timeout=WAIT_S)  # before the fix: never (it polled and slept for ever)
    assert done, "the loop ran on after its cancellation"
    assert loop.cancelled()
