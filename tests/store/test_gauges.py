"""The gauges' figures are read by the store (store/_gauges.py), from a real Valkey, with a client of their own."""

from __future__ import annotations

import redis
from redis.asyncio import Redis

from budgetwarden.domain import CheckInput, Decision, Planner
from budgetwarden.domain._policy import parse_policy
from budgetwarden.limiter import Limiter
from budgetwarden.store import BudgetStore, GaugeReader, TenantKeys

NOW = 1_796_000_000_000
POLICY = parse_policy(
    """
tenants:
  acme:
    windows:
      day: {tokens: 10000}
      month: {usd: 5}
task_types:
  agent:
    per_task: {tokens: 5000}
default_task_type: agent
""",
    "test",
)


def check(task_id: str, step_id: str, tokens: int) -> CheckInput:
    return CheckInput(
        tenant_id="acme",
        task_id=task_id,
        step_id=step_id,
        task_type="",
        model="",
        input_tokens=tokens,
        output_tokens=0,
        tool_calls=0,
        lease_seconds=60,
    )


async def test_the_reader_sees_live_reservations_and_what_each_token_window_has_left(
    async_redis: Redis, sync_redis: redis.Redis, redis_url: str
) -> None:
    limiter = Limiter(
        BudgetStore(async_redis), lambda: POLICY, clock=lambda: NOW, store_deadline_s=30.0, check_deadline_s=30.0
    )
    for task_id, step_id, tokens in (("t1", "s1", 3000), ("t2", "s1", 2500)):
        assert (await limiter.check(check(task_id, step_id, tokens))).verdict.decision is Decision.ALLOW
    tenant = POLICY.policy.tenant("acme")
    assert tenant is not None
    windows = Planner().window_scopes(tenant, NOW)
    reader = GaugeReader(sync_redis)
    # The month window limits cost only: no tokens-left figure for it.
    assert reader.read("acme", windows, NOW) == (2, {"day": 10000 - 5500})
    # Once both leases have lapsed nothing is live; what they hold counts until the sweep frees it.
    assert reader.read("acme", windows, NOW + 61_000)[0] == 0
    assert reader.read("initech", windows, NOW) == (0, {"day": 10000})
    # A report past the limit (charged whatever it cost) leaves nothing, never less than nothing.
    day = next(scope.span for scope in windows if scope.span is not None and scope.limit is not None)
    sync_redis.hset(TenantKeys("initech").window(day), mapping={"used": 12000, "reserved": 0})
    assert reader.read("initech", windows, NOW) == (0, {"day": 0})
    own = GaugeReader.from_url(redis_url, cluster=False, timeout_s=5.0)
    try:
        assert own.read("acme", windows, NOW) == (2, {"day": 4500})
    finally:
        own.close()
