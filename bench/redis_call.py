"""The client side of the one hot Redis call: what a unary check's EVALSHA costs the sidecar's process, by client.

    .venv/bin/python bench/redis_call.py [--calls 20000] [--rounds 3] [--write docs/benchmarks.md]

The call is a real check's: the keys and arguments BudgetStore.reserve_many sends for one check (captured from one),
sent to a script that only returns as many replies as a check (so the script's own cost, measured by bench/h2load.py
from Valkey's INFO commandstats, stays out). Clients, in one process, alternating, on one Valkey:

redis-py + hiredis   - what the sidecar uses: redis.asyncio with its hiredis parser (redis[hiredis]);
redis-py, no hiredis - the same client with its pure-Python parser;
hiredis protocol     - a minimal asyncio protocol: the command packed by hand, the reply parsed by hiredis.Reader.

Serial: one call at a time; 16 at once: 16 callers (redis-py takes a pooled connection per call in flight, the
protocol pipelines on one). CPU: the process's CPU time per call.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from budgetwarden.domain import CheckInput
from budgetwarden.domain._policy import parse_policy
from budgetwarden.limiter import Limiter
from budgetwarden.store._embedded import EmbeddedRedis, free_port
from budgetwarden.store._store import BudgetStore

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, publish  # noqa: E402
from harness import POLICY  # noqa: E402

# As many replies as check.lua gives for one check (a table per check), without its work.
ECHO_LUA = "return {{1, 0, '', 0, {0, 0, 0, 0}}}"


async def captured_call(url: str) -> tuple[list[Any], list[Any]]:
    """The keys and arguments of one real check's script call."""
    redis = Redis.from_url(url)
    store = BudgetStore(redis)
    seen: list[tuple[list[Any], list[Any]]] = []
    real = store._check

    async def capture(keys: list[Any], args: list[Any]) -> Any:
        seen.append((list(keys), list(args)))
        return await real(keys=keys, args=args)

    store._check = capture  # type: ignore[assignment]
    limiter = Limiter(store, lambda: parse_policy(POLICY, "bench"), batch_unary=False)
    request = CheckInput(tenant_id="bench", task_id="task-1", step_id="step-1", task_type="", model="",
                         input_tokens=800, output_tokens=200, tool_calls=0)  # fmt: skip
    await limiter.check(request)
    await redis.aclose()
    return seen[0]


class HiredisProtocol(asyncio.Protocol):
    """One connection; replies are matched to calls in order (Redis answers in order)."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(reply)

    def call(self, packed: bytes) -> asyncio.Future[Any]:
        assert self.transport is not None
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        self.transport.write(packed)
        return future


def pack(*parts: Any) -> bytes:
    encoded = [part if isinstance(part, bytes) else str(part).encode() for part in parts]
    return b"".join([b"*%d\r\n" % len(encoded), *(b"$%d\r\n%s\r\n" % (len(part), part) for part in encoded)])


async def measure(call: Callable[[], Awaitable[Any]], calls: int, concurrency: int) -> tuple[float, float]:
    """(calls per second, CPU µs per call)."""

    async def caller() -> None:
        for _ in range(calls // concurrency):
            await call()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    took, spent = time.perf_counter() - wall, time.process_time() - cpu
    done = calls // concurrency * concurrency
    return done / took, spent / done * 1e6


async def run(url: str, calls: int, rounds: int) -> list[tuple[str, int, float, float]]:
    keys, args = await captured_call(url)
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    with_hiredis = Redis.from_url(url)
    plain = Redis.from_url(url)
    from redis._parsers import _AsyncRESP2Parser

    plain.connection_pool.connection_kwargs["parser_class"] = _AsyncRESP2Parser
    assert plain.connection_pool.connection_kwargs["parser_class"] is _AsyncRESP2Parser
    echo = AsyncScript(with_hiredis, ECHO_LUA)
    echo_plain = AsyncScript(plain, ECHO_LUA)
    await echo(keys=keys, args=args)
    sha = echo.sha
    _, protocol = await asyncio.get_running_loop().create_connection(HiredisProtocol, host, int(port))
    packed = pack("EVALSHA", sha, len(keys), *keys, *args)
    expected = await echo(keys=keys, args=args)
    assert await protocol.call(packed) == expected
    clients: dict[str, Callable[[], Awaitable[Any]]] = {
        "redis-py + hiredis (the sidecar's)": lambda: echo(keys=keys, args=args),
        "redis-py, pure-Python parser": lambda: echo_plain(keys=keys, args=args),
        "hiredis protocol": lambda: protocol.call(packed),
    }
    results = []
    for _ in range(rounds):
        for concurrency in (1, 16):
            for name, call in clients.items():
                rate, cpu = await measure(call, calls, concurrency)
                results.append((name, concurrency, rate, cpu))
                print(f"{name:>36} x{concurrency:<2}: {rate:8,.0f}/s {cpu:6.1f} µs CPU/call", flush=True)
    await with_hiredis.aclose()
    await plain.aclose()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        valkey = EmbeddedRedis(Path(tmp) / "valkey", port=free_port(), persistent=True)
        url = valkey.start()
        try:
            results = asyncio.run(run(url, args.calls, args.rounds))
        finally:
            valkey.stop()
    lines = [
        f"### The check's Redis call, by client ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python bench/redis_call.py --calls {args.calls} --rounds "
        f"{args.rounds}`. One real check's EVALSHA (its keys and arguments) to a script that only returns a check's "
        "reply, so that this is the client's cost (the script's own is in the h2load run); Valkey on the same cores. "
        "Median of the rounds, and the range.",
        "",
        "| client | calls at once | calls/s | CPU µs per call (this process) |",
        "|---|---|---|---|",
    ]
    for name in dict.fromkeys(r[0] for r in results):
        for concurrency in (1, 16):
            mine = [r for r in results if r[0] == name and r[1] == concurrency]
            rates, cpus = [r[2] for r in mine], [r[3] for r in mine]
            lines.append(
                f"| {name} | {concurrency} | {statistics.median(rates):,.0f} ({min(rates):,.0f} to {max(rates):,.0f}) "
                f"| {statistics.median(cpus):.0f} ({min(cpus):.0f} to {max(cpus):.0f}) |"
            )
    lines.append("")
    publish(lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
