"""The Lua scripts on their own, against a real server: keys and arguments exactly as documented in each script."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from budgetwarden.domain._model import MAX_LIMIT_TOKENS, MAX_LIMIT_USD
from budgetwarden.store._store import load_lua

NOW = 1_796_000_000_000  # a fixed "now" (2026-11): times are arguments, never the server's clock
P = "bw1:{acme}:"
LEASES = P + "leases"
TASK = P + "task:t1"
DAY = P + "win:day:2026-11-27"
MINUTE = P + "win:minute:2026-11-27T08:34+0000"
USAGE = P + "usage"
HOUR_MS = 3_600_000


Window = tuple[str, int, int] | tuple[str, int, int, int]  # key, token limit, [micro-USD limit,] alive-until
Candidate = int | tuple[int, int, int] | tuple[int, int, int, str]  # tokens, or (tokens, micro-USD, bound[, label])


def tokens_only(flat: list[Any]) -> list[int]:
    """(limit, used, reserved) per scope out of the scripts' six figures per scope."""
    out: list[int] = []
    for i in range(0, len(flat), 6):
        out += [int(v) for v in flat[i : i + 3]]
    return out


DEFAULT_WINDOWS: list[Window] = [(DAY, 5000, NOW + 24 * HOUR_MS), (MINUTE, 800, NOW + 60_000)]


def check_arg(
    step: str,
    candidates: list[Candidate],
    lease_until: int,
    task_limit: int = 1000,
    task_limit_usd: int = -1,
    soft_bp: int = -1,
    checkpoint_bp: int = -1,
    fingerprint: str = "fp",
) -> str:
    """The one argument of a check: its fields joined by the unit separator (see lua/check.lua). The answer's parts
    are "common" and "answer<i>" for the i-th candidate; a candidate's label is ALLOW unless given."""
    fields: list[Any] = [lease_until, task_limit, task_limit_usd, soft_bp, checkpoint_bp, "t1", "general", step]
    fields += ["ck1.x.y.", fingerprint, "common"]
    for i, candidate in enumerate(candidates):
        given = (candidate, 0, 0) if isinstance(candidate, int) else candidate
        fields += [*given[:3], given[3] if len(given) > 3 else "ALLOW", f"answer{i}"]
    return "\x1f".join(str(f) for f in fields)


def report_arg(
    step: str, tokens: int, *, usd: int = 0, key: str = "", fallback: bool = True, windows: str = "1"
) -> tuple[list[str], str]:
    """The keys and the one argument of a usage record (see lua/report.lua): without ``fallback`` it names no task
    and no window."""
    keys = [P + "resv:" + step, P + "idem:" + (key or "resv:" + step), TASK if fallback else P + "resv:" + step]
    event = json.dumps({"step_id": step, "tokens": tokens})
    fields: list[Any] = [tokens, usd, 1 if fallback else 0, 0 if key else 1, "t1", "general", key and f"event-{key}"]
    fields += [windows if fallback else "", event]
    # The record's fingerprint, that it names a model (so the cost given is used), its uncached, cached, output tokens.
    fields += [f"{tokens}/{usd}", 1, tokens, 0, 0]
    return keys, "\x1f".join(str(f) for f in fields)


class Scripts:
    """Calls each script with its documented keys and arguments. ``check``/``report``/``budget`` return the token
    figures in a compact list; ``last`` keeps the whole reply."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.last: list[Any] = []
        self._check = client.register_script(load_lua("check"))
        self._report = client.register_script(load_lua("report"))
        self._release = client.register_script(load_lua("release"))
        self._budget = client.register_script(load_lua("budget"))
        self._admin = client.register_script(load_lua("admin"))

    def check(
        self,
        step: str,
        candidates: list[Candidate],
        *,
        now: int = NOW,
        lease_ms: int = 60_000,
        task_limit: int = 1000,
        task_limit_usd: int = -1,
        soft_bp: int = -1,
        checkpoint_bp: int = -1,
        windows: list[Window] | None = None,
        fingerprint: str = "fp",
    ) -> list[int]:
        """Returns [status, fitted, granted tokens, lease, then limit, used, reserved per scope]."""
        windows = DEFAULT_WINDOWS if windows is None else windows
        step_arg = check_arg(
            step, candidates, now + lease_ms, task_limit, task_limit_usd, soft_bp, checkpoint_bp, fingerprint
        )
        self.last = self.check_many([(step, step_arg)], now=now, windows=windows)[0]
        reply = self.last
        return [int(reply[0]), int(reply[1]), int(reply[2]), int(reply[4]), *tokens_only(reply[8:])]

    def check_many(self, steps: list[tuple[str, str]], *, now: int = NOW, windows: list[Window]) -> list[list[Any]]:
        """One script call for many (step, argument) pairs of the same task; returns the whole reply of each."""
        keys = [LEASES] + [w[0] for w in windows]
        args: list[Any] = [now, 86_400_000, P + "resv:", 7 * 86_400_000, len(windows)]
        for window in windows:
            _, limit, *rest = window
            limit_usd, until = (rest[0], rest[1]) if len(rest) == 2 else (-1, rest[0])
            args += [limit, limit_usd, until]
        for step, arg in steps:
            keys += [P + "resv:" + step, TASK]
            args.append(arg)
        return [list(reply) for reply in self._check(keys=keys, args=args)]

    def report(
        self, step: str, tokens: int, *, usd: int = 0, key: str = "", now: int = NOW, fallback: bool = True
    ) -> list[int]:
        """Returns [status, charged, refunded, overage, task known, task limit, used, reserved]."""
        self.last = self.report_many([report_arg(step, tokens, usd=usd, key=key, fallback=fallback)], now=now)[0]
        reply = [int(v) for v in self.last[:12]]  # then the task type
        return [reply[0], reply[1], reply[3], reply[4], reply[5], *reply[6:9]]

    def report_many(
        self, records: list[tuple[list[str], str]], *, now: int = NOW, windows: list[tuple[str, float]] | None = None
    ) -> list[list[Any]]:
        """One script call for many (keys, argument) records; ``windows`` are (key, alive-until), the day window
        unless given. Returns the whole reply of each."""
        windows = [(DAY, NOW + 24 * HOUR_MS)] if windows is None else windows
        keys = [LEASES, USAGE, *(key for key, _ in windows)]
        args: list[Any] = [now, 86_400_000, P + "resv:", 7 * 86_400_000, 1000, 0, len(windows)]
        args += [until for _, until in windows]
        for record_keys, arg in records:
            keys += record_keys
            args.append(arg)
        return [list(reply) for reply in self._report(keys=keys, args=args)]

    def release(self, step: str, *, now: int = NOW) -> list[int]:
        return [int(v) for v in self._release(keys=[P + "resv:" + step, LEASES], args=[now, P + "resv:"])]

    def budget(self, *, now: int = NOW) -> list[Any]:
        """Returns [task known, task type, active, then limit, used, reserved per scope]."""
        self.last = list(self._budget(keys=[LEASES, TASK, DAY, MINUTE], args=[now, P + "resv:", 5000, -1, 800, -1]))
        reply = self.last
        return [int(reply[0]), reply[1], int(reply[2]), *tokens_only(reply[8:])]

    def admin(self, *args: Any, now: int = NOW) -> list[int]:
        extra = [MAX_LIMIT_TOKENS, MAX_LIMIT_USD, ""]  # the highest ceilings, no request id (a deny ignores them)
        return [int(v) for v in self._admin(keys=[TASK], args=[args[0], now, 7 * 86_400_000, *args[1:], *extra])]

    def held(self, key: str, usd: bool = False) -> tuple[int, int]:
        fields = ("used_usd", "reserved_usd") if usd else ("used", "reserved")
        used, reserved = self.client.hmget(key, *fields)
        return int(used or 0), int(reserved or 0)


@pytest.fixture
def lua(sync_redis: redis.Redis) -> Scripts:
    return Scripts(sync_redis)


def test_check_reserves_on_every_scope(lua: Scripts) -> None:
    reply = lua.check("s1", [300])
    assert reply[:4] == [1, 0, 300, NOW + 60_000]
    assert reply[4:] == [1000, 0, 300, 5000, 0, 300, 800, 0, 300]
    for key in (TASK, DAY, MINUTE):
        assert lua.held(key) == (0, 300)
    assert lua.client.zscore(LEASES, "s1") == NOW + 60_000
    assert lua.client.hget(P + "resv:s1", "state") == b"reserved"


def test_all_or_nothing_when_one_scope_does_not_fit(lua: Scripts) -> None:
    lua.check("s1", [700])
    reply = lua.check("s2", [200])  # fits task (900 <= 1000) and day, not the minute (900 > 800)
    assert reply[:4] == [0, -1, 0, 0]
    for key in (TASK, DAY, MINUTE):
        assert lua.held(key) == (0, 700)
    assert not lua.client.exists(P + "resv:s2")


def test_exactly_at_the_limit_fits_and_one_more_does_not(lua: Scripts) -> None:
    windows: list[tuple[str, int, int]] = []
    assert lua.check("s1", [600], windows=windows)[0] == 1
    assert lua.check("s2", [401], windows=windows)[0] == 0
    assert lua.check("s3", [400], windows=windows)[0] == 1
    assert lua.held(TASK) == (0, 1000)


def test_first_fitting_candidate_is_reserved(lua: Scripts) -> None:
    lua.check("s1", [600], windows=[])
    reply = lua.check("s2", [900, 500, 300], windows=[])  # 900 and 500 do not fit next to 600; 300 does
    assert reply[:3] == [1, 2, 300]
    assert lua.held(TASK) == (0, 900)


def test_candidates_reserve_only_one(lua: Scripts) -> None:
    reply = lua.check("s1", [2000, 700, 100], windows=[])
    assert reply[:3] == [1, 1, 700]
    assert lua.held(TASK) == (0, 700)


def test_no_candidate_only_reads(lua: Scripts) -> None:
    reply = lua.check("s1", [])
    assert reply[:4] == [0, -1, 0, 0]
    assert not lua.client.exists(DAY)
    assert not lua.client.exists(MINUTE)


def test_same_step_twice_is_one_reservation(lua: Scripts) -> None:
    first = lua.check("s1", [300])
    again = lua.check("s1", [300], now=NOW + 5_000)
    assert again[0] == 2
    assert again[2:4] == first[2:4]
    assert lua.held(TASK) == (0, 300)
    lua.report("s1", 250)
    assert lua.check("s1", [300])[0] == 2  # a reported step is not reserved again
    assert lua.held(TASK) == (250, 0)


def test_task_ceiling_is_fixed_by_the_first_check(lua: Scripts) -> None:
    lua.check("s1", [100], task_limit=400, windows=[])
    reply = lua.check("s2", [350], task_limit=5000, windows=[])
    assert reply[0] == 0
    assert reply[4] == 400


def test_lease_expiry_frees_the_budget_without_a_job(lua: Scripts) -> None:
    lua.check("s1", [700], lease_ms=10_000)
    assert lua.check("s2", [400], now=NOW + 9_999)[0] == 0  # still held
    reply = lua.check("s2", [400], now=NOW + 10_000)  # the lease ran out: swept by this very call
    assert reply[0] == 1
    assert lua.held(TASK) == (0, 400)
    assert lua.client.hget(P + "resv:s1", "state") == b"expired"
    assert lua.client.zscore(LEASES, "s1") is None


def test_expired_step_may_reserve_again(lua: Scripts) -> None:
    lua.check("s1", [100], lease_ms=1_000)
    reply = lua.check("s1", [100], now=NOW + 2_000)
    assert reply[0] == 1
    assert lua.held(TASK) == (0, 100)


def test_report_refunds_an_overestimate(lua: Scripts) -> None:
    lua.check("s1", [500])
    assert lua.report("s1", 320) == [1, 320, 180, 0, 1, 1000, 320, 0]
    for key in (TASK, DAY, MINUTE):
        assert lua.held(key) == (320, 0)
    assert lua.client.hget(P + "resv:s1", "state") == b"reported"
    assert lua.client.zcard(LEASES) == 0


def test_report_charges_beyond_the_reservation(lua: Scripts) -> None:
    lua.check("s1", [500])
    assert lua.report("s1", 1300)[:4] == [1, 1300, 0, 800]
    assert lua.held(TASK) == (1300, 0)  # recorded even above the ceiling: real spend is never dropped
    assert lua.check("s2", [0], windows=[])[0] == 0  # and nothing more fits


def test_duplicate_report_is_applied_once(lua: Scripts) -> None:
    lua.check("s1", [500])
    lua.report("s1", 200, key="k1")
    assert lua.report("s1", 200, key="k1")[0] == 2
    assert lua.held(TASK) == (200, 0)


def test_keyless_report_counts_once_per_reservation(lua: Scripts) -> None:
    lua.check("s1", [500], lease_ms=1_000)
    assert lua.report("s1", 100, now=NOW + 2_000)[0] == 3  # late: charged without its (lapsed) reservation
    assert lua.report("s1", 100, now=NOW + 2_000)[0] == 2  # a retry of it is a duplicate
    assert lua.check("s1", [300], now=NOW + 3_000)[0] == 2  # the step was reported: a check replays
    lua.check("s2", [200])
    assert lua.release("s2") == [1, 200]
    assert lua.check("s2", [250])[:3] == [1, 0, 250]  # released, so reserved again: a new generation
    assert lua.report("s2", 240)[0] == 1  # whose keyless report is applied, not taken for an older one
    assert lua.report("s2", 240)[0] == 2
    assert lua.held(TASK) == (340, 0)


def test_report_after_the_lease_is_charged_as_unreserved(lua: Scripts) -> None:
    lua.check("s1", [500], lease_ms=1_000)
    reply = lua.report("s1", 450, now=NOW + 5_000)
    assert reply[:4] == [3, 450, 0, 0]
    assert lua.held(TASK) == (450, 0)
    assert lua.held(DAY) == (450, 0)


def test_report_without_reservation_charges_the_fallback_scopes(lua: Scripts) -> None:
    reply = lua.report("ghost", 90)
    assert reply[0] == 3
    assert lua.held(TASK) == (90, 0)
    assert lua.held(DAY) == (90, 0)
    assert 0 < lua.client.pttl(DAY) <= 24 * HOUR_MS  # a window created by a report expires too
    # The task's ceiling is still fixed by its first check, and that earlier usage counts against it.
    assert lua.check("s1", [911], windows=[])[0] == 0
    assert lua.check("s1", [910], windows=[])[0] == 1


def test_release_hands_back_once(lua: Scripts) -> None:
    lua.check("s1", [500])
    assert lua.release("s1", now=NOW + 1) == [1, 500]
    assert lua.release("s1", now=NOW + 2) == [2, 0]
    for key in (TASK, DAY, MINUTE):
        assert lua.held(key) == (0, 0)
    assert lua.release("nothing") == [5, 0]


def test_release_after_report_or_expiry(lua: Scripts) -> None:
    lua.check("s1", [500])
    lua.report("s1", 100)
    assert lua.release("s1") == [3, 0]
    lua.check("s2", [100], lease_ms=1_000)
    assert lua.release("s2", now=NOW + 1_000) == [4, 0]
    assert lua.held(TASK) == (100, 0)


def test_window_rollover_starts_from_zero(lua: Scripts) -> None:
    minute_1 = [(MINUTE, 800, NOW + 60_000)]
    minute_2 = [(P + "win:minute:2026-11-27T08:35+0000", 800, NOW + 120_000)]
    assert lua.check("s1", [800], windows=minute_1)[0] == 1
    assert lua.check("s2", [100], windows=minute_1, now=NOW + 30_000)[0] == 0
    assert lua.check("s2", [100], windows=minute_2, now=NOW + 60_000)[0] == 1


def test_counts_in_a_finished_window_are_not_touched(lua: Scripts) -> None:
    lua.check("s1", [500], windows=[(MINUTE, 800, NOW + 60_000)], lease_ms=600_000)
    # Reported after the minute window's key is no longer alive: only live scopes are charged.
    lua.report("s1", 200, now=NOW + 60_000)
    assert lua.held(TASK) == (200, 0)
    assert lua.held(MINUTE) == (0, 500)


def test_keys_expire_relative_to_the_callers_clock(lua: Scripts) -> None:
    lua.check("s1", [100], lease_ms=60_000)
    assert 0 < lua.client.pttl(MINUTE) <= 60_000
    assert 0 < lua.client.pttl(P + "resv:s1") <= 60_000 + 86_400_000
    assert 0 < lua.client.pttl(TASK) <= 7 * 86_400_000


def test_budget_reads_after_sweeping_leases(lua: Scripts) -> None:
    lua.check("s1", [100], lease_ms=1_000)
    lua.check("s2", [200], lease_ms=60_000)
    reply = lua.budget(now=NOW + 1_000)
    assert reply[:3] == [1, b"general", 1]
    assert reply[3:] == [1000, 0, 200, 5000, 0, 200, 800, 0, 200]


def test_purge_is_bounded_per_call(lua: Scripts) -> None:
    for i in range(300):
        lua.check(f"s{i}", [1], lease_ms=1_000, windows=[])
    lua.check("probe", [], now=NOW + 1_000, windows=[])
    assert lua.client.zcard(LEASES) == 300 - 256
    lua.check("probe", [], now=NOW + 1_000, windows=[])
    assert lua.client.zcard(LEASES) == 0
    assert lua.held(TASK) == (0, 0)


def test_a_replay_answers_what_the_reservation_kept(lua: Scripts) -> None:
    """The record keeps the fingerprint and the answer (common part, the reserved candidate's part); a degraded grant
    (a label other than ALLOW) also keeps the figures of its reply. A replay hands the answer back in the detail slot
    with the figures as they are now."""
    first = lua.check("s1", [(2000, 0, 0, "ALLOW"), (400, 7, 1, "DEGRADE:short")], windows=[])
    assert first[:4] == [1, 1, 400, NOW + 60_000]
    tail = " ".join(str(int(v)) for v in lua.last[6:])
    assert tail == "-1 -1 1000 0 400 -1 0 7"
    stored = lua.client.hmget(P + "resv:s1", "fp", "answer", "admitted")
    assert stored == [b"fp", f"common\x1eanswer1\x1e{tail}".encode(), b"DEGRADE:short"]
    lua.check("s2", [100], windows=[])
    again = lua.check("s1", [(2000, 0, 0, "ALLOW"), (400, 7, 1, "DEGRADE:short")], now=NOW + 5_000, windows=[])
    assert again[:4] == [2, -1, 400, NOW + 60_000]
    assert lua.last[3] == 7
    assert lua.last[5] == f"common\x1eanswer1\x1e{tail}".encode()
    assert again[4:] == [1000, 0, 500]  # the figures now
    lua.check("s3", [100], windows=[])
    assert lua.client.hget(P + "resv:s3", "answer") == b"common\x1eanswer0"  # an ALLOW keeps no figures


def test_a_recheck_with_another_fingerprint_writes_nothing(lua: Scripts) -> None:
    lua.check("s1", [300])
    before = {key: lua.client.hgetall(key) for key in (TASK, DAY, MINUTE, P + "resv:s1")}
    reply = lua.check("s1", [600], now=NOW + 1_000, fingerprint="other")
    assert reply[:4] == [5, -1, 0, 0]
    assert lua.last[5] == b""
    assert reply[4:] == [1000, 0, 300, 5000, 0, 300, 800, 0, 300]
    assert {key: lua.client.hgetall(key) for key in before} == before
    lua.report("s1", 250)
    assert lua.check("s1", [300], fingerprint="other")[0] == 5  # a reported step too
    assert lua.release("s1")[0] == 3


def test_a_record_from_before_fingerprints_replays(lua: Scripts) -> None:
    lua.check("s1", [300])
    lua.client.hdel(P + "resv:s1", "fp", "answer")
    again = lua.check("s1", [600], fingerprint="other")
    assert again[:4] == [2, -1, 300, NOW + 60_000]
    assert lua.last[5] == b""


def test_a_released_step_reserves_anew_with_another_request(lua: Scripts) -> None:
    lua.check("s1", [300])
    assert lua.release("s1", now=NOW + 1)[0] == 1
    assert lua.check("s1", [500], now=NOW + 2, fingerprint="other")[:3] == [1, 0, 500]
    assert lua.client.hget(P + "resv:s1", "fp") == b"other"


def test_a_batch_sweeps_as_much_as_its_checks_would_one_by_one(lua: Scripts) -> None:
    for i in range(300):
        lua.check(f"s{i}", [1], lease_ms=1_000, windows=[])
    probes = [(f"p{i}", check_arg(f"p{i}", [], NOW + 61_000)) for i in range(2)]
    lua.check_many(probes, now=NOW + 1_000, windows=[])
    assert lua.client.zcard(LEASES) == 0  # two checks: up to 2 x 256 expired leases swept
    assert lua.held(TASK) == (0, 0)


@pytest.mark.parametrize(
    ("argument", "error"),
    [
        ("1\x1f2", "check argument 1 is malformed"),
        (f"{NOW}.5\x1f1000\x1f-1\x1f-1\x1f-1\x1ft1\x1fgeneral\x1fs9\x1fck\x1ffp\x1f", "check argument 1 is malformed"),
        (
            f"{NOW}\x1f1000\x1f-1\x1f-1\x1f-1\x1ft1\x1fgeneral\x1fs9\x1fck\x1ffp\x1f\x1f5",
            "check argument 1 is malformed",
        ),
        (
            f"{NOW}\x1f1000\x1f-1\x1f-1\x1f-1\x1ft1\x1fgeneral\x1fs9\x1fck\x1ffp\x1f\x1f-5\x1f0\x1f0\x1fALLOW\x1f",
            "malformed candidate",
        ),
        (
            f"{NOW}\x1f1000\x1f-1\x1f-1\x1f-1\x1ft1\x1fgeneral\x1fs9\x1fck\x1ffp\x1f\x1fmany\x1f0\x1f0\x1fALLOW\x1f",
            "malformed candidate",
        ),
    ],
)
def test_a_malformed_check_in_a_batch_writes_nothing(lua: Scripts, argument: str, error: str) -> None:
    good = check_arg("s1", [100], NOW + 60_000)
    with pytest.raises(redis.ResponseError, match=error):
        lua.check_many([("s1", good), ("s9", argument)], windows=DEFAULT_WINDOWS)
    assert lua.client.dbsize() == 0  # the good check before it reserved nothing either


# --- cost, thresholds, checkpoints, administration ----------------------------------------------------------------


def test_cost_is_a_second_dimension_on_every_scope(lua: Scripts) -> None:
    windows: list[Window] = [(DAY, 5000, 10_000, NOW + 24 * HOUR_MS)]
    assert lua.check("s1", [(100, 6_000, 0)], windows=windows, task_limit_usd=50_000)[0] == 1
    assert lua.held(DAY, usd=True) == (0, 6_000)
    assert lua.held(TASK, usd=True) == (0, 6_000)
    reply = lua.check("s2", [(100, 4_001, 0)], windows=windows, task_limit_usd=50_000)
    assert reply[0] == 0  # tokens fit, cost does not: nothing is reserved anywhere
    assert lua.held(TASK) == (0, 100)
    assert lua.check("s3", [(100, 4_000, 0)], windows=windows)[0] == 1  # exactly at the cost limit
    assert lua.report("s1", 80, usd=5_000)[:4] == [1, 80, 20, 0]
    assert lua.held(DAY, usd=True) == (5_000, 4_000)
    assert lua.release("s3") == [1, 100]
    assert lua.held(TASK, usd=True) == (5_000, 0)


def test_soft_bound_only_limits_the_request_as_asked(lua: Scripts) -> None:
    # ceiling 1000, soft 80% = 800: the request as asked (bound 0) must stay under 800; a degraded one (bound 1)
    # only under the ceiling (no checkpoint threshold).
    assert lua.check("s1", [(700, 0, 0)], soft_bp=8000, windows=[])[0] == 1
    reply = lua.check("s2", [(200, 0, 0), (150, 0, 1)], soft_bp=8000, windows=[])
    assert reply[:3] == [1, 1, 150]
    assert lua.check("s3", [(100, 0, 0), (100, 0, 1)], soft_bp=8000, windows=[])[:3] == [1, 1, 100]
    assert lua.check("s4", [(51, 0, 0), (51, 0, 1)], soft_bp=8000, windows=[])[0] == 0  # 950 + 51 > 1000


def test_checkpoint_opens_when_only_the_checkpoint_line_is_in_the_way(lua: Scripts) -> None:
    # ceiling 1000, checkpoint 90% = 900
    assert lua.check("s1", [(850, 0, 1)], checkpoint_bp=9000, windows=[])[0] == 1
    reply = lua.check("s2", [(100, 0, 0), (60, 0, 1)], checkpoint_bp=9000, windows=[])
    assert reply[0] == 3
    assert lua.last[5] == b"ck1.x.y.1"
    assert lua.held(TASK) == (0, 850)  # nothing granted
    # While it is open, every check of the task stops there, even a tiny one.
    assert lua.check("s3", [(1, 0, 1)], checkpoint_bp=9000, windows=[])[0] == 3
    assert lua.last[5] == b"ck1.x.y.1"
    assert lua.budget()[:3] == [1, b"general", 1]
    assert lua.last[3:6] == [b"ck1.x.y.1", NOW, 0]
    # Approval raises the ceiling (and so the checkpoint line, 90% of 1500 = 1350) and lets the task go on.
    assert lua.admin("approve", "ck1.x.y.1", 500, 0)[:2] == [1, 1500]
    assert lua.admin("approve", "ck1.x.y.1", 500, 0)[:2] == [2, 1500]  # idempotent
    assert lua.check("s2", [(100, 0, 0)], checkpoint_bp=9000, windows=[])[0] == 1
    assert lua.check("s4", [(401, 0, 1)], checkpoint_bp=9000, windows=[])[0] == 3  # 1351 > 1350: the next one
    assert lua.last[5] == b"ck1.x.y.2"


def test_no_checkpoint_when_a_window_is_what_blocks(lua: Scripts) -> None:
    windows: list[Window] = [(MINUTE, 100, NOW + 60_000)]
    assert lua.check("s1", [(950, 0, 1)], checkpoint_bp=9000, windows=windows)[0] == 0
    assert lua.client.hget(TASK, "checkpoint") is None


def test_checkpoint_at_the_ceiling_instead_of_a_denial(lua: Scripts) -> None:
    assert lua.check("s1", [(1000, 0, 1)], checkpoint_bp=10000, windows=[])[0] == 1
    assert lua.check("s2", [(1, 0, 1)], checkpoint_bp=10000, windows=[])[0] == 3
    assert lua.check("s2", [(1, 0, 1)], windows=[], task_limit=5)[0] == 3  # thresholds are the task's, not the call's


def test_denied_checkpoint_closes_the_task(lua: Scripts) -> None:
    assert lua.check("s1", [(850, 0, 1)], checkpoint_bp=9000, windows=[])[0] == 1
    assert lua.check("s2", [(100, 0, 1)], checkpoint_bp=9000, windows=[])[0] == 3
    assert lua.check("s1", [(850, 0, 1)], checkpoint_bp=9000, windows=[])[0] == 2  # a held step still replays
    assert lua.admin("approve", "ck1.x.y.9", 5, 0)[0] == 5  # no such checkpoint
    assert lua.admin("deny", "ck1.x.y.1")[0] == 3
    assert lua.admin("deny", "ck1.x.y.1")[0] == 4
    assert lua.admin("approve", "ck1.x.y.1", 5, 0)[0] == 6  # decided the other way
    assert lua.check("s3", [(1, 0, 0)], windows=[])[0] == 4
    assert lua.release("s1") == [1, 850]  # what was held can still be handed back


def test_thresholds_are_exact_for_large_limits(lua: Scripts) -> None:
    limit = 999_999_999_999_999
    for bp in (1, 3333, 9999):
        lua.client.delete(TASK)
        expected = limit * bp // 10_000
        assert lua.check("a", [(expected, 0, 1)], task_limit=limit, checkpoint_bp=bp, windows=[])[0] == 1
        lua.release("a")
        assert lua.check("b", [(expected + 1, 0, 1)], task_limit=limit, checkpoint_bp=bp, windows=[])[0] == 3


def test_a_ceiling_set_before_the_first_check_stays(lua: Scripts) -> None:
    assert lua.admin("ceiling", "set", 300, "")[:2] == [7, 300]
    assert lua.check("s1", [301], windows=[], task_limit=1000, checkpoint_bp=9000)[0] == 3  # 90% of 300 = 270
    assert lua.client.hget(TASK, "ckpt_bp") == b"9000"  # the first check still set the thresholds
    assert lua.admin("ceiling", "add", 100, "")[1] == 400
    assert lua.admin("ceiling", "add", "", 5_000)[4] == -1  # adding to a cost ceiling that does not exist: none
    assert lua.admin("ceiling", "set", "", 5_000)[4] == 5_000


# --- usage events ----------------------------------------------------------------------------------------------


def events(lua: Scripts) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in lua.client.xrange(USAGE, "-", "+")]


def test_every_applied_record_is_one_event_written_with_its_charge(lua: Scripts) -> None:
    lua.check("s1", [300])
    lua.report("s1", 250, key="k1")
    lua.report("s1", 250, key="k1")  # duplicate: no second event
    lua.report("ghost", 40)  # unreserved, keyless: its id comes from the reservation id and generation
    got = events(lua)
    assert [(e["id"], e["status"], e["admitted"], e["task_type"]) for e in got] == [
        ("event-k1", "applied", "ALLOW", "general"),
        ("ghost-0", "unreserved", "NONE", "general"),
    ]
    assert json.loads(got[0]["event"]) == {"step_id": "s1", "tokens": 250}


def test_the_stream_is_capped(lua: Scripts) -> None:
    for i in range(3000):
        lua.report(f"s{i}", 1, key=f"k{i}")
    assert lua.client.xlen(USAGE) < 3000  # MAXLEN ~ 1000 trims in whole nodes, so roughly, never unbounded
    assert lua.client.xlen(USAGE) >= 1000


# --- batches of usage records ---------------------------------------------------------------------------------------


def test_a_batch_of_records_applies_each_in_order_as_if_alone(lua: Scripts) -> None:
    lua.check("s1", [300])
    replies = lua.report_many(
        [
            report_arg("s1", 250, key="k1"),
            report_arg("s1", 250, key="k1"),  # the same record again, later in the same batch: a duplicate
            report_arg("ghost", 40),  # no reservation: charged to the task and the record's window (the day)
            report_arg("ghost2", 7, windows="2"),  # another window of the batch: the minute
            report_arg("ghost3", 5, fallback=False),  # no task, no window: only an event
        ],
        windows=[(DAY, NOW + 24 * HOUR_MS), (MINUTE, NOW + 60_000)],
    )
    assert [int(reply[0]) for reply in replies] == [1, 2, 3, 3, 3]
    assert [int(reply[3]) for reply in replies] == [50, 0, 0, 0, 0]  # refunded
    assert [int(reply[5]) for reply in replies] == [1, 0, 1, 1, 0]  # task known
    # Each reply shows the task as it stood right after its record: 250, then + 40, then + 7.
    assert [int(reply[7]) for reply in replies] == [250, 0, 290, 297, 0]
    assert lua.held(TASK) == (297, 0)
    assert lua.held(DAY) == (250 + 40, 0)
    assert lua.held(MINUTE) == (250 + 7, 0)
    assert 0 < lua.client.pttl(MINUTE) <= 60_000
    assert [(e["id"], e["status"]) for e in events(lua)] == [
        ("event-k1", "applied"),
        ("ghost-0", "unreserved"),
        ("ghost2-0", "unreserved"),
        ("ghost3-0", "unreserved"),
    ]


def test_keyless_reports_of_one_reservation_in_one_batch_count_once(lua: Scripts) -> None:
    lua.check("s1", [300])
    replies = lua.report_many([report_arg("s1", 100), report_arg("s1", 100)])
    assert [int(reply[0]) for reply in replies] == [1, 2]
    assert lua.held(TASK) == (100, 0)


@pytest.mark.parametrize(
    ("argument", "error"),
    [
        ("1\x1f2\x1f1", "report argument 1 is malformed"),
        ("many\x1f0\x1f1\x1f1\x1ft1\x1fgeneral\x1f\x1f1\x1f{}", "report argument 1 is malformed"),
        ("1.5\x1f0\x1f1\x1f1\x1ft1\x1fgeneral\x1f\x1f1\x1f{}", "report argument 1 is malformed"),
        ("-1\x1f0\x1f1\x1f1\x1ft1\x1fgeneral\x1f\x1f1\x1f{}", "report argument 1 is malformed"),
        ("5\x1fnan\x1f1\x1f1\x1ft1\x1fgeneral\x1f\x1f1\x1f{}", "report argument 1 is malformed"),
        (
            "5\x1f0\x1f1\x1f1\x1ft1\x1fgeneral\x1f\x1f2\x1f{}\x1ffp\x1f1\x1f5\x1f0\x1f0",
            "report argument 1 names an unknown window",
        ),
    ],
)
def test_a_malformed_record_in_a_batch_writes_nothing(lua: Scripts, argument: str, error: str) -> None:
    lua.check("s1", [300])
    before = {key: lua.client.dump(key) for key in lua.client.keys("*")}
    with pytest.raises(redis.ResponseError, match=error):
        lua.report_many([report_arg("s1", 250, key="k1"), (report_arg("s9", 1)[0], argument)])
    assert {key: lua.client.dump(key) for key in lua.client.keys("*")} == before  # not even the good record before it


@pytest.mark.parametrize(
    ("windows", "now", "error"),
    [
        ([(DAY, 0)], NOW, "report window 1 has a malformed alive-until"),
        ([(DAY, NOW + 1.5)], NOW, "report window 1 has a malformed alive-until"),
        ([(DAY, NOW + HOUR_MS)], -5, r"report argument ARGV\[1\] is malformed"),
    ],
)
def test_a_report_batch_with_malformed_times_writes_nothing(
    lua: Scripts, windows: list[tuple[str, float]], now: int, error: str
) -> None:
    with pytest.raises(redis.ResponseError, match=error):
        lua.report_many([report_arg("s1", 250, key="k1")], windows=windows, now=now)
    assert lua.client.dbsize() == 0


def test_one_call_sweeps_at_most_four_steps_worth_of_expired_leases(lua: Scripts) -> None:
    for i in range(1100):
        lua.check(f"s{i}", [0], lease_ms=1_000, windows=[])
    lua.report_many([report_arg(f"p{i}", 1, fallback=False) for i in range(10)], now=NOW + 1_000)
    assert lua.client.zcard(LEASES) == 1100 - 4 * 256  # ten records, but one call holds the server for four sweeps
    lua.check_many([(f"q{i}", check_arg(f"q{i}", [], NOW + 61_000)) for i in range(10)], now=NOW + 1_000, windows=[])
    assert lua.client.zcard(LEASES) == 0


def test_a_report_batch_with_the_wrong_number_of_keys_writes_nothing(lua: Scripts) -> None:
    keys, argument = report_arg("s1", 250, key="k1")
    with pytest.raises(redis.ResponseError, match="expected 6 keys, got 5"):
        lua.report_many([(keys[:2], argument)])
    assert lua.client.dbsize() == 0
