"""Issue 16, fault injection: Redis and the sidecar killed, stopped and restarted, and Redis made slow, under load.

For each fault, while it lasts every check gets an answer (from the store or from the configured fail mode; for a
sidecar that is gone, an error the client library's fail mode answers) and never INTERNAL or a hang; no task is granted
more than its ceiling; no acknowledged report is lost where the durability setting promises it; and the service
decides again once the fault ends.

Short form in ``make test``: one round of each fault, held for a few checks. The long form (more rounds, longer
faults) runs with ``BW_FAULTS_LONG=1``; ``BW_FAULTS_RESULTS=<file>`` appends each test's figures as a JSON line there.
``bench/faults.py`` does both and writes the table into docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from budgetwarden.store._embedded import EmbeddedRedis

from support import RunningSidecar, free_port
from support_faults import (
    DelayProxy,
    FaultLoad,
    RedisFaults,
    ServedSidecar,
    lost_reports,
    phase,
    summary,
    task_counted,
    thaw,
    wait_for,
)

pytestmark = pytest.mark.slow

LONG = os.environ.get("BW_FAULTS_LONG") == "1"
ROUNDS = 3 if LONG else 1
# A fault lasts until this many checks started during it were answered, and at least FAULT_SECONDS.
FAULT_CHECKS = 60 if LONG else 6
FAULT_SECONDS = 5.0 if LONG else 0.0
RUN_UP_CALLS = 50 if LONG else 5  # decided checks and acknowledged reports before each fault
# Short enough that a fault is answered by the fail mode quickly; a healthy check that misses it on a busy machine is
# answered by the fail mode too, which nothing below counts as a failure (recovery waits for a decision).
CHECK_DEADLINE_MS = 500
STORE_DEADLINE_MS = 1000
SIDECAR_FAULT_TIMEOUT_S = 3.0  # the client's deadline while the sidecar itself is the fault
# A check answered: by the store, by the sidecar's fail mode, or shed at once as overloaded (a busy machine can make
# the sidecar's event loop late enough for that; the client library answers it with its fail mode).
ANSWERED = {"decided", "fail-mode", "shed"}
REPORTED = {"acked", "UNAVAILABLE"}  # a report the store could not take in time is not acknowledged
FAIL_MODE_DECISION = {"open": "DECISION_ALLOW", "closed": "DECISION_DENY"}


def record_figures(fault: str, fail_mode: str, figures: dict[str, Any]) -> None:
    path = os.environ.get("BW_FAULTS_RESULTS")
    if path:
        with open(path, "a") as file:
            file.write(json.dumps({"fault": fault, "fail_mode": fail_mode, "rounds": ROUNDS, **figures}) + "\n")


def run_up(load: FaultLoad) -> None:
    """Before a fault: wait until the store has decided a few more checks and acknowledged a few more reports, so the
    fault hits reservations and acknowledged usage already in the store."""
    decided, acked = load.count("check", load.phase, "decided"), load.count("report", load.phase, "acked")
    wait_for(
        lambda: (
            load.count("check", load.phase, "decided") >= decided + RUN_UP_CALLS
            and load.count("report", load.phase, "acked") >= acked + RUN_UP_CALLS
        ),
        f"{RUN_UP_CALLS} checks decided and reports acknowledged before the fault",
    )


def hold_fault(load: FaultLoad) -> None:
    """Keep the fault until FAULT_CHECKS more checks started under it have finished, and FAULT_SECONDS passed."""
    since, began = len(load.of("check", "fault")), time.monotonic()
    wait_for(
        lambda: len(load.of("check", "fault")) - since >= FAULT_CHECKS and time.monotonic() - began >= FAULT_SECONDS,
        f"{FAULT_CHECKS} checks answered during the fault",
    )


def recover(load: FaultLoad) -> float:
    """Seconds from the end of a fault until a check started after it is decided by the store."""
    since = load.count("check", "after", "decided")
    return wait_for(lambda: load.count("check", "after", "decided") > since, "a check is decided again")


def assert_ceilings_hold(load: FaultLoad, addr: str) -> None:
    """Run on until the store denies each task (its ceiling reached), then: what was granted, and what the store holds,
    is within each ceiling."""
    for task_id in load.task_ids:
        wait_for(lambda task_id=task_id: load.denied_by_store(task_id), f"{task_id} reaches its ceiling")
    for task_id in load.task_ids:
        granted = load.granted(task_id)
        assert granted <= load.ceiling, f"{task_id}: {granted} tokens granted over a ceiling of {load.ceiling}"
        used, reserved, limit = task_counted(addr, load.tenant_id, task_id)
        assert limit == load.ceiling
        assert used + reserved <= load.ceiling, f"{task_id}: the store holds {used} used + {reserved} reserved"


def assert_store_faults_answered(load: FaultLoad, fail_mode: str) -> None:
    """While the store is at fault, every check is answered (by the store or the fail mode, as configured) and every
    report is acknowledged or refused as UNAVAILABLE: nothing else (no INTERNAL, no client deadline missed)."""
    checks = load.outcomes("check")
    assert set(checks) <= ANSWERED, f"checks came to {dict(checks)}"
    assert load.count("check", "fault", "fail-mode") > 0, f"no fail-mode answer during the fault: {dict(checks)}"
    fail_mode_decisions = {call.decision for call in load.of("check") if call.outcome == "fail-mode"}
    wrong = fail_mode_decisions - {FAIL_MODE_DECISION[fail_mode]}
    assert not wrong, f"fail mode {fail_mode} answered {wrong}"
    reports = load.outcomes("report")
    assert set(reports) <= REPORTED, f"reports came to {dict(reports)}"


# --- Redis faults --------------------------------------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own (the faults would hurt the session's), with an append-only file on everysec, as a
    default Redis runs."""
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), persistent=True, appendfsync="everysec")
    server.start()
    yield server
    if server.pid is not None:
        thaw(server.pid)  # a test that failed while the server was stopped
    server.kill()


def store_fault_sidecar(
    start_sidecar: Callable[..., RunningSidecar], redis_url: str, **settings: Any
) -> RunningSidecar:
    return start_sidecar(
        redis_url=redis_url,
        check_deadline_ms=CHECK_DEADLINE_MS,
        store_deadline_ms=STORE_DEADLINE_MS,
        store_ping_timeout_ms=500,
        store_ping_interval_seconds=0.2,
        **settings,
    )


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
def test_redis_killed_and_restarted(
    start_sidecar: Callable[..., RunningSidecar], own_redis: EmbeddedRedis, fail_mode: str
) -> None:
    """SIGKILL of Redis: nothing it did not fsync survives. With --durability aof-local (WAITAOF 1 0 before each
    acknowledgement) every acknowledged report is in the append-only file the restarted server loads."""
    faults = RedisFaults(own_redis)
    sidecar = store_fault_sidecar(start_sidecar, own_redis.url, fail_mode=fail_mode, durability="aof-local")
    recovery = 0.0
    with FaultLoad(sidecar.addr, tenant_id="kill") as load:
        for _ in range(ROUNDS):
            run_up(load)
            with phase(load, "fault"):
                faults.kill()
                hold_fault(load)
                faults.restart()
            recovery = max(recovery, recover(load))
        assert_ceilings_hold(load, sidecar.addr)
    assert_store_faults_answered(load, fail_mode)
    assert not lost_reports(sidecar.addr, load.tenant_id, load.acked_keys())
    record_figures("Redis SIGKILL, restart (aof-local)", fail_mode, summary(load, recovery))


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
def test_redis_stopped_and_resumed(
    start_sidecar: Callable[..., RunningSidecar], own_redis: EmbeddedRedis, fail_mode: str
) -> None:
    """SIGSTOP of Redis: connections stay open and nothing answers, so each check waits its deadline, then its fail
    mode answers. Nothing is lost (the server keeps its memory), whatever the durability setting."""
    faults = RedisFaults(own_redis)
    sidecar = store_fault_sidecar(start_sidecar, own_redis.url, fail_mode=fail_mode, durability="none")
    recovery = 0.0
    with FaultLoad(sidecar.addr, tenant_id="stop") as load:
        for _ in range(ROUNDS):
            run_up(load)
            with phase(load, "fault"):
                faults.stop()
                try:
                    hold_fault(load)
                finally:
                    faults.resume()
            recovery = max(recovery, recover(load))
        assert_ceilings_hold(load, sidecar.addr)
    assert_store_faults_answered(load, fail_mode)
    assert not lost_reports(sidecar.addr, load.tenant_id, load.acked_keys())
    record_figures("Redis SIGSTOP, SIGCONT", fail_mode, summary(load, recovery))


@pytest.fixture
def slow_redis(own_redis: EmbeddedRedis) -> Iterator[DelayProxy]:
    assert own_redis.port is not None
    proxy = DelayProxy("127.0.0.1", own_redis.port).start()
    yield proxy
    proxy.close()


def test_redis_slower_than_the_check_deadline(
    start_sidecar: Callable[..., RunningSidecar], slow_redis: DelayProxy
) -> None:
    """Redis answers, but each answer comes later than the check deadline (a delay proxy in front of it): the fail
    mode answers each check in time; a report waits its store deadline. Then the delay ends and checks are decided."""
    sidecar = store_fault_sidecar(start_sidecar, slow_redis.url, fail_mode="closed", durability="none")
    recovery = 0.0
    with FaultLoad(sidecar.addr, tenant_id="slow") as load:
        for _ in range(ROUNDS):
            run_up(load)
            with phase(load, "fault"):
                slow_redis.delay_s = 4 * CHECK_DEADLINE_MS / 1000
                try:
                    hold_fault(load)
                finally:
                    slow_redis.delay_s = 0.0
            recovery = max(recovery, recover(load))
        assert_ceilings_hold(load, sidecar.addr)
    assert_store_faults_answered(load, "closed")
    assert not lost_reports(sidecar.addr, load.tenant_id, load.acked_keys())
    record_figures(f"Redis {4 * CHECK_DEADLINE_MS} ms slow (delay proxy)", "closed", summary(load, recovery))


# --- sidecar faults ------------------------------------------------------------------------------------------------


@pytest.fixture
def served(redis_url: str, tmp_path: Path) -> Iterator[ServedSidecar]:
    """A ``budgetwarden serve`` process on the session's Redis."""
    sidecar = ServedSidecar(
        {"redis_url": redis_url, "check_deadline_ms": str(CHECK_DEADLINE_MS), "fail_mode": "closed"},
        tmp_path / "serve.log",
    )
    sidecar.start()
    yield sidecar
    sidecar.close()


def assert_sidecar_faults_answered(load: FaultLoad) -> None:
    """While the sidecar is gone or stopped, a call fails as unreachable (UNAVAILABLE or DEADLINE_EXCEEDED: what the
    client library's fail mode answers), never with anything else; a check it answered is decided or in fail mode."""
    for kind in ("check", "report"):
        unexpected = [
            call.outcome
            for call in load.of(kind)
            if call.outcome not in ANSWERED | {"acked", "UNAVAILABLE", "DEADLINE_EXCEEDED"}
        ]
        assert not unexpected, f"{kind}s came to {dict(load.outcomes(kind))}"
    during = load.outcomes("check", "fault")
    assert during["UNAVAILABLE"] + during["DEADLINE_EXCEEDED"] > 0, f"the fault was not felt: {dict(during)}"


def test_sidecar_killed_and_restarted(served: ServedSidecar) -> None:
    """SIGKILL of the sidecar: calls fail as unreachable until it is back; every report it acknowledged is in Redis
    (it acknowledges only what Redis accepted); reservations it made still count against their ceilings."""
    recovery = 0.0
    with FaultLoad(served.addr, tenant_id="sidecar-kill", timeout=SIDECAR_FAULT_TIMEOUT_S) as load:
        for _ in range(ROUNDS):
            run_up(load)
            with phase(load, "fault"):
                served.kill()
                hold_fault(load)
                served.start()
            recovery = max(recovery, recover(load))
        assert_ceilings_hold(load, served.addr)
    assert_sidecar_faults_answered(load)
    assert not lost_reports(served.addr, load.tenant_id, load.acked_keys())
    record_figures("sidecar SIGKILL, restart", "closed", summary(load, recovery))


def test_sidecar_stopped_and_resumed(served: ServedSidecar) -> None:
    """SIGSTOP of the sidecar: calls wait until the client's deadline (DEADLINE_EXCEEDED, the client's fail mode);
    after SIGCONT it works through what queued and decides again."""
    recovery = 0.0
    with FaultLoad(served.addr, tenant_id="sidecar-stop", timeout=SIDECAR_FAULT_TIMEOUT_S) as load:
        for _ in range(ROUNDS):
            run_up(load)
            with phase(load, "fault"):
                served.stop()
                try:
                    hold_fault(load)
                finally:
                    served.resume()
            recovery = max(recovery, recover(load))
        assert_ceilings_hold(load, served.addr)
    assert_sidecar_faults_answered(load)
    assert not lost_reports(served.addr, load.tenant_id, load.acked_keys())
    record_figures("sidecar SIGSTOP, SIGCONT", "closed", summary(load, recovery))
