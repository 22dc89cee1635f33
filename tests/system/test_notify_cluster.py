"""Notifications on a real Redis Cluster (issue 14): the tenants' streams are found on every node, read through
their consumer groups and acknowledged, with the same scripts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from redis.asyncio.cluster import RedisCluster
from test_cluster import cluster_url  # noqa: F401 (the fixture: three Valkey nodes)

from budgetwarden.notify import Backoff, Deliverer, Target
from budgetwarden.store import NotificationQueue, TenantKeys

from support import RunningSidecar
from support_admin import TWO_TENANTS_POLICY, open_checkpoint
from support_notify import Receiver, deliver_all


async def test_events_of_tenants_on_several_nodes_are_delivered_and_acknowledged(
    tmp_path: Path,
    start_sidecar: Callable[..., RunningSidecar],
    cluster_url: str,  # noqa: F811
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(TWO_TENANTS_POLICY)
    running = start_sidecar(redis_url=cluster_url, redis_cluster=True, policy_file=policy)
    tenants = ("acme", "globex")
    for tenant in tenants:
        await asyncio.to_thread(open_checkpoint, running.addr, tenant, "task")
    receiver = Receiver().start()
    client = RedisCluster.from_url(cluster_url)
    deliverer = Deliverer(
        NotificationQueue(client, "cluster"),
        [Target(receiver.url)],
        source="/bw",
        secret_file=None,
        max_attempts=3,
        backoff=Backoff(0.01, 0.01, jitter=False),
        timeout_s=60,
        rescan_interval_s=0,
    )
    try:
        await deliver_all(deliverer)
        await asyncio.to_thread(receiver.wait_for, lambda r: len(r.events()) == 2)
        assert sorted(e["subject"] for e in receiver.events()) == ["acme/task", "globex/task"]
        for tenant in tenants:
            assert await client.xlen(TenantKeys(tenant).prefix + "notify") == 0
    finally:
        await deliverer.aclose()
        await client.aclose()
        receiver.stop()
