"""Baseline servers for the benchmark, measured in the same run as budgetwarden:

floor  - the transport floor: a grpc.aio Check handler that does nothing and returns a response of the same size
         as budgetwarden's typical answer;
naive  - the straightforward implementation: a grpc.aio Check handler doing one EVALSHA of a small reserve script
         per check (no policy, no validation, no telemetry).

  python bench/baselines.py floor --listen 127.0.0.1:PORT
  python bench/baselines.py naive --listen 127.0.0.1:PORT --redis-url redis://...
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc
from redis.asyncio import Redis

from budgetwarden_api.v1 import budget_pb2 as pb

SERVICE = "budgetwarden.v1.BudgetService"

# Reserve `amount` on one counter if it fits under `limit`: the least a budget check can do in Redis.
NAIVE_LUA = """
local used = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
if used + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], 'reserved', ARGV[1])
redis.call('HSET', KEYS[2], 'amount', ARGV[1])
return 1
"""


def typical_response() -> pb.CheckResponse:
    response = pb.CheckResponse(
        decision=pb.DECISION_ALLOW,
        reservation_id="0" * 32,
        granted_tokens=1000,
        reason=pb.REASON_WITHIN_BUDGET,
        message="allowed 1000 tokens",
        requested_tokens=1000,
        policy_version="0" * 12,
    )
    response.lease_expires_at.GetCurrentTime()
    for name in ("task", "tenant.month", "tenant.day", "tenant.minute"):
        scope = response.scopes.add(name=name, limit_tokens=10**9, used_tokens=12345, reserved_tokens=1000)
        scope.remaining_tokens = 10**9 - 13345
    return response


async def serve(kind: str, listen: str, redis_url: str | None) -> None:
    canned = typical_response().SerializeToString()

    async def floor(request: bytes, context: Any) -> bytes:
        return canned

    redis = Redis.from_url(redis_url) if redis_url else None
    script = redis.register_script(NAIVE_LUA) if redis else None

    async def naive(request: bytes, context: Any) -> bytes:
        assert script is not None
        check = pb.CheckRequest.FromString(request)
        amount = check.estimated_input_tokens + check.max_output_tokens
        keys = [f"naive:{{{check.tenant_id}}}:{check.task_id}", f"naive:{{{check.tenant_id}}}:r:{check.step_id}"]
        fitted = await script(keys=keys, args=[amount, 10**15])
        response = pb.CheckResponse(decision=pb.DECISION_ALLOW if fitted else pb.DECISION_DENY, granted_tokens=amount)
        return response.SerializeToString()

    handler = floor if kind == "floor" else naive
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(handler)})]
    )
    server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await server.stop(1)
    if redis is not None:
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["floor", "naive"])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args()
    asyncio.run(serve(args.kind, args.listen, args.redis_url))


if __name__ == "__main__":
    main()
