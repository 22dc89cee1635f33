"""The fit rule lives twice: in lua/check.lua (atomic) and in _decision.simulate (pure, for explain and tests).
Hypothesis drives both with the same counters, thresholds and candidates; they must choose the same thing."""

from __future__ import annotations

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budgetwarden.domain._decision import Bound, Candidate, CheckPlan, Shape, simulate
from budgetwarden.domain._model import Amount, Counter, Scope, ScopeKind, StoreStatus, Thresholds
from budgetwarden.store._store import load_lua

NOW = 1_796_000_000_000
P = "bw1:{prop}:"
TASK, DAY, MINUTE = P + "task:t", P + "win:day:x", P + "win:minute:x"

limits = st.one_of(st.none(), st.integers(0, 5000))
held = st.integers(0, 3000)
bp = st.one_of(st.none(), st.integers(1, 10_000))
counters = st.tuples(limits, held, held, limits, held, held)
bounds = st.sampled_from([Bound.SOFT, Bound.CHECKPOINT])


def near_room(data: st.DataObject, scopes: list[tuple[int | None, int, int, int | None, int, int]], unit: int) -> int:
    """An amount that often lands exactly on, or one off, the room left in some scope: where rules differ."""
    rooms = [c[3 * unit] - c[3 * unit + 1] - c[3 * unit + 2] for c in scopes if c[3 * unit] is not None]
    choices = [r + d for r in rooms for d in (-1, 0, 1) if r + d >= 0]
    if choices and data.draw(st.booleans()):
        return data.draw(st.sampled_from(choices))
    return data.draw(st.integers(0, 3000))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    task=counters,
    day=counters,
    minute=counters,
    soft=bp,
    checkpoint=bp,
    count=st.integers(0, 5),
    data=st.data(),
)
def test_check_script_chooses_what_the_rules_choose(
    sync_redis: redis.Redis,
    task: tuple[int | None, int, int, int | None, int, int],
    day: tuple[int | None, int, int, int | None, int, int],
    minute: tuple[int | None, int, int, int | None, int, int],
    soft: int | None,
    checkpoint: int | None,
    count: int,
    data: st.DataObject,
) -> None:
    scopes = [task, day, minute]
    candidates = [(near_room(data, scopes, 0), near_room(data, scopes, 1), data.draw(bounds)) for _ in range(count)]
    if soft is not None and checkpoint is not None and soft > checkpoint:
        soft, checkpoint = checkpoint, soft  # the policy never allows soft above checkpoint
    sync_redis.flushall()
    none = -1
    fields = {
        "init": 1,
        "limit": none if task[0] is None else task[0],
        "limit_usd": none if task[3] is None else task[3],
    }
    fields |= {"used": task[1], "reserved": task[2], "used_usd": task[4], "reserved_usd": task[5]}
    fields |= {"soft_bp": none if soft is None else soft, "ckpt_bp": none if checkpoint is None else checkpoint}
    sync_redis.hset(TASK, mapping=fields)
    for key, c in ((DAY, day), (MINUTE, minute)):
        sync_redis.hset(key, mapping={"used": c[1], "reserved": c[2], "used_usd": c[4], "reserved_usd": c[5]})

    args: list[int | str] = [NOW, 60_000, P + "resv:", 600_000, 2]
    for c in (day, minute):
        args += [none if c[0] is None else c[0], none if c[3] is None else c[3], NOW + 60_000]
    step: list[int | str] = [NOW + 60_000, none, none, none, none, "t", "general", "s", "ck1.p.", "fp", ""]
    for tokens, usd, bound in candidates:
        step += [tokens, usd, int(bound), "ALLOW", ""]
    args.append("\x1f".join(str(field) for field in step))
    (reply,) = sync_redis.register_script(load_lua("check"))(
        keys=[P + "leases", DAY, MINUTE, P + "resv:s", TASK], args=args
    )

    shape = Shape(model="m", input_tokens=0, output_tokens=0, tool_calls=0)
    plan = CheckPlan(
        requested=Amount(0),
        task_type="general",
        thresholds=Thresholds(soft, checkpoint),
        lease_seconds=None,
        counted=(
            Scope(name="task", kind=ScopeKind.TASK, limit=task[0], limit_usd=task[3]),
            Scope(name="tenant.day", kind=ScopeKind.TENANT_WINDOW, limit=day[0], limit_usd=day[3]),
            Scope(name="tenant.minute", kind=ScopeKind.TENANT_WINDOW, limit=minute[0], limit_usd=minute[3]),
        ),
        step=None,
        candidates=tuple(Candidate(Amount(t, u), b, shape, None) for t, u, b in candidates),
        shape=shape,
    )
    before = tuple(
        Counter(limit=c[0], used=c[1], reserved=c[2], limit_usd=c[3], used_usd=c[4], reserved_usd=c[5])
        for c in (task, day, minute)
    )
    expected = simulate(plan, before, Thresholds(soft, checkpoint))
    status, fitted = StoreStatus(int(reply[0])), int(reply[1])
    assert status is expected.status
    assert (None if fitted < 0 else fitted) == expected.fitted
