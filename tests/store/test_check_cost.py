"""What check.lua costs Valkey, counted in the commands it issues (INFO commandstats counts a script's own calls), and
that the cheaper way of writing the counters leaves exactly the figures the old one did. Counts, not times: they do
not depend on how busy the machine is."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from budgetwarden.store._store import load_lua

NOW = 1_796_000_000_000
P = "bw1:{cost}:"
LEASES = P + "leases"
DAY = P + "win:day:2026-11-30"
HOUR = P + "win:hour:2026-11-30T21"
HOUR_MS = 3_600_000


def check_arg(step: str, task: str, tokens: int, usd: int) -> str:
    """One check's argument (see lua/check.lua): no task ceiling, no thresholds, one ALLOW candidate."""
    fields: list[Any] = [NOW + 60_000, -1, -1, -1, -1, task, "general", step, "ck1.x.y.", "fp", "common"]
    fields += [tokens, usd, 0, "ALLOW", "answer0"]
    return "\x1f".join(str(f) for f in fields)


def check_batch(client: redis.Redis, steps: list[tuple[str, str, int, int]]) -> list[Any]:
    """One check.lua call for (step, task, tokens, micro-USD) checks of one tenant, on a day and an hour window."""
    script = client.register_script(load_lua("check"))
    keys = [LEASES, DAY, HOUR]
    args: list[Any] = [NOW, 86_400_000, P + "resv:", 7 * 86_400_000, 2]
    args += [2 * 10**15, 2 * 10**15, NOW + 24 * HOUR_MS, 2 * 10**15, -1, NOW + HOUR_MS]
    for step, task, tokens, usd in steps:
        keys += [P + "resv:" + step, P + "task:" + task]
        args.append(check_arg(step, task, tokens, usd))
    return list(script(keys=keys, args=args))


def commands_run(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT, the script's own included."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in stats.items()}


def figures(client: redis.Redis, key: str, *fields: str) -> list[int]:
    return [int(value or 0) for value in client.hmget(key, list(fields))]


@pytest.fixture
def client(sync_redis: redis.Redis) -> redis.Redis:
    for key in sync_redis.scan_iter(match=P + "*"):
        sync_redis.delete(key)
    check_batch(sync_redis, [("warm", "t0", 1, 0)])  # the script loaded, the windows created
    return sync_redis


def test_a_batch_of_one_task_reads_and_writes_its_hash_once(client: redis.Redis) -> None:
    checks = 50
    check_batch(client, [("first", "t1", 1, 0)])  # the task initialised: what follows is the steady state
    client.config_resetstat()
    replies = check_batch(client, [(f"s{i}", "t1", 10, 3) for i in range(checks)])
    calls = commands_run(client)
    assert [int(reply[0]) for reply in replies] == [1] * checks
    # One HMGET per reservation record, one for the task, one per window; the task's counters written once.
    assert calls.get("hmget") == checks + 1 + 2, calls
    assert "hincrby" not in calls, calls
    # The records, the task and the two windows.
    assert calls.get("hset") == checks + 1 + 2, calls


def test_the_counters_are_what_the_batch_reserved(client: redis.Redis) -> None:
    before = figures(client, DAY, "reserved", "reserved_usd")
    check_batch(client, [("a1", "ta", 100, 7), ("b1", "tb", 20, 0), ("a2", "ta", 5, 1), ("a1", "ta", 100, 7)])
    assert figures(client, P + "task:ta", "reserved", "reserved_usd", "active") == [105, 8, 2]  # a1 again: a replay
    assert figures(client, P + "task:tb", "reserved", "reserved_usd", "active") == [20, 0, 1]
    day = figures(client, DAY, "reserved", "reserved_usd")
    assert [day[0] - before[0], day[1] - before[1]] == [125, 8]
    assert figures(client, HOUR, "reserved")[0] == day[0]


def test_large_counters_are_written_as_whole_numbers(client: redis.Redis) -> None:
    big = 10**15  # a ceiling's largest value: its figures must not turn into 1e+15
    check_batch(client, [("big1", "tbig", big - 1, big - 1), ("big2", "tbig", 1, 1)])
    assert client.hmget(P + "task:tbig", "reserved", "reserved_usd") == [str(big).encode(), str(big).encode()]
