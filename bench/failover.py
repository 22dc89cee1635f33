"""What a failover of the Redis primary costs under load: for Redis Sentinel and for Redis Cluster, each fail mode and
each --durability, a fresh deployment and sidecar, steady load from client threads, and a SIGKILL of the primary.

Sentinel: a Valkey primary, two replicas and three sentinels (down-after-milliseconds 1000). Cluster: three primaries;
the one that owns the load's tenants has two replicas (cluster-node-timeout 1000 ms); that one is killed. Two replicas,
so that the promoted one still has a replica and `--durability replicas` (WAIT 1) can acknowledge writes again.

Each client thread runs tasks of one tenant, one after another: a Check of --step tokens per step against a task
ceiling of --ceiling tokens (an explicit task ceiling), and for every step allowed (by the store or by the fail mode)
a Report of the tokens it was granted, with an idempotency key; a report that fails is sent again after the load, until
acknowledged. The sidecar (`budgetwarden serve`, the production check deadline of 250 ms) is killed nowhere; each
check's gRPC deadline is --deadline-ms.

Per run:
  answered in deadline - of the checks sent between the kill and the recovery, the share answered before their
                         gRPC deadline (by the store or by the fail mode); the rest failed (DEADLINE_EXCEEDED,
                         UNAVAILABLE, ...);
  fail-mode answers    - checks answered by the fail mode (open: allowed unchecked; closed: denied);
  first decided        - from the kill to the first check decided by the store after the first one that was not;
  recovered            - from the kill to the last check not decided by the store (after it, every check is, but
                         for a stray one more than a second after the one before);
  acknowledged unreplicated - tokens of the reservations granted and the reports acknowledged from the moment the
                         replicas' link is being cut to the kill: an upper bound on what the failover can lose, and
                         so over-grant (with `replicas`, the few in it were confirmed before the link dropped);
  overspend            - tokens the store granted beyond a task's ceiling, summed over tasks (fail-open grants
                         are not the store's and are counted apart);
  usage lost           - tokens of acknowledged reports that Redis no longer counts after the failover;
  reports refused      - reports answered with an error (sent again after the load until acknowledged).
The bound: the overspend can be no more than the tokens of the acknowledged reservations and reports lost with the
primary (with `replicas`, none: a write is acknowledged only once a replica holds it).

    .venv/bin/python bench/failover.py [--threads 4] [--before 3] [--after 12] [--write docs/reliability.md]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import grpc
import redis

from budgetwarden.store import TenantKeys
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import BudgetClient

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _common import machine, percentile, publish, wait_serving  # noqa: E402

from support import free_port  # noqa: E402
from support_cluster import FAILOVER_NODE_TIMEOUT_MS, Cluster, slot_owner  # noqa: E402
from support_sentinel import SentinelGroup  # noqa: E402
from support_sentinel import wait_until as wait_sentinel  # noqa: E402

POLICY = "default_tenant: {windows: {day: {tokens: 1000000000000}}}\ndefault_task_type: t\ntask_types: {t: {}}\n"
LINKS = {"up": "in sync", "cut": "link cut"}
PRIMARIES = 3
KILLED = 0  # the cluster primary that owns the load's tenants


@dataclass
class CheckSample:
    sent: float
    answered: float
    outcome: str  # "store", "fail-mode" or the gRPC code's name
    granted: int  # tokens the store granted (0 for a fail-mode answer)
    fail_open_tokens: int


@dataclass
class Load:
    """What the client threads did: every check, the tokens each task got from the store, the reports."""

    checks: list[CheckSample] = field(default_factory=list)
    granted: dict[tuple[str, str], int] = field(default_factory=dict)
    acknowledged: dict[tuple[str, str], int] = field(default_factory=dict)
    unacknowledged: list[pb.UsageRecord] = field(default_factory=list)
    reports_failed: int = 0
    report_acks: list[tuple[float, int]] = field(default_factory=list)  # when, and how many tokens
    last_report_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Result:
    run: Run
    checks: int
    outage_checks: int
    in_deadline: float
    fail_mode_answers: int
    first_decided_s: float
    recovered_s: float
    overspend: int
    fail_open_tokens: int
    lost: int
    unreplicated: int
    reports_failed: int
    check_p99_ms: float


def tenants_on_killed_primary(count: int) -> list[str]:
    names: list[str] = []
    n = 0
    while len(names) < count:
        name = f"bench-{n}"
        if slot_owner(TenantKeys(name).leases, PRIMARIES) == KILLED:
            names.append(name)
        n += 1
    return names


def drive(addr: str, tenant: str, args: argparse.Namespace, load: Load, stop: threading.Event) -> None:
    """One client thread: tasks one after another, a check per step and a report per allowed step."""
    deadline_s = args.deadline_ms / 1000
    with BudgetClient(addr, timeout=deadline_s) as client:
        while not stop.is_set():
            task = uuid.uuid4().hex[:12]
            for step in range(10 * args.ceiling // args.step):
                if stop.is_set():
                    break
                step_id = f"s{step}"
                sent = time.monotonic()
                try:
                    answer = client.check(
                        tenant_id=tenant,
                        task_id=task,
                        step_id=step_id,
                        estimated_input_tokens=args.step,
                        max_output_tokens=0,
                        task_ceiling_tokens=args.ceiling,
                    )
                except grpc.RpcError as exc:
                    sample = CheckSample(sent, time.monotonic(), exc.code().name, 0, 0)  # type: ignore[attr-defined]
                    with load.lock:
                        load.checks.append(sample)
                    time.sleep(0.01)  # as a client backs off before it tries again
                    continue
                allowed = answer.decision == pb.DECISION_ALLOW
                from_store = not answer.from_fail_mode
                granted = answer.granted_tokens if allowed and from_store else 0
                fail_open = answer.granted_tokens if allowed and not from_store else 0
                sample = CheckSample(sent, time.monotonic(), "store" if from_store else "fail-mode", granted, fail_open)
                with load.lock:
                    load.checks.append(sample)
                    load.granted[tenant, task] = load.granted.get((tenant, task), 0) + granted
                if not allowed:
                    if from_store:
                        break  # the ceiling is reached: the next task
                    time.sleep(0.01)
                    continue
                record = pb.UsageRecord(
                    tenant_id=tenant,
                    task_id=task,
                    step_id=step_id,
                    input_tokens=answer.granted_tokens,
                    idempotency_key=f"{task}-{step_id}",
                )
                send_report(client, record, load)


def send_report(client: BudgetClient, record: pb.UsageRecord, load: Load) -> bool:
    try:
        (result,) = client.report([record]).results
    except grpc.RpcError as exc:
        with load.lock:
            load.last_report_error = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
            load.unacknowledged.append(record)
            load.reports_failed += 1
        return False
    if result.status in (pb.REPORT_STATUS_APPLIED, pb.REPORT_STATUS_UNRESERVED):
        key = (record.tenant_id, record.task_id)
        with load.lock:
            load.acknowledged[key] = load.acknowledged.get(key, 0) + record.input_tokens
            load.report_acks.append((time.monotonic(), record.input_tokens))
    return True


def settle(addr: str, load: Load) -> None:
    """Send the reports that failed again until each is acknowledged (they are idempotent)."""
    pending = list(load.unacknowledged)
    load.unacknowledged.clear()
    give_up = time.monotonic() + 120
    with BudgetClient(addr, timeout=10) as client:
        while pending:
            assert time.monotonic() < give_up, f"{len(pending)} reports never acknowledged: {load.last_report_error}"
            record = pending.pop(0)
            before = len(load.unacknowledged)
            if not send_report(client, record, load):
                load.unacknowledged.pop(before)
                load.reports_failed -= 1  # counted once, when it first failed
                pending.append(record)
                time.sleep(0.05)


def lost_usage(addr: str, load: Load) -> int:
    """Tokens of acknowledged reports that Redis does not count, summed over tasks."""
    lost = 0
    with BudgetClient(addr, timeout=10) as client:
        for tenant, task in sorted(load.acknowledged):
            answer = client.get_budget(tenant_id=tenant, task_id=task)
            (scope,) = [scope for scope in answer.scopes if scope.name == "task"]
            lost += max(0, load.acknowledged[tenant, task] - scope.used_tokens)
    return lost


@contextmanager
def sidecar(tmp: Path, url: str, *flags: str) -> Iterator[str]:
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    addr = f"127.0.0.1:{free_port()}"
    log = (tmp / f"sidecar-{addr.rsplit(':', 1)[1]}.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "budgetwarden", "serve", "--listen", addr, "--redis-url", url,
         "--policy-file", str(policy), "--log-level", "WARNING", "--store-ping-interval-seconds", "0.1", *flags],
        cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_serving(addr, timeout=60)
        yield addr
    finally:
        server.terminate()
        server.wait(30)
        log.close()


@dataclass
class Deployment:
    url: str
    flags: list[str]
    kill: Callable[[], None]  # SIGKILL the primary, and wait until a replica is promoted
    cut: Callable[[], None]  # the primary drops its replicas and refuses them again: from now on writes stay on it


def cut_replicas(primary: redis.Redis, replicas: list[redis.Redis]) -> None:
    """What a broken replication link does, made certain: the primary drops its replicas and refuses their PSYNC."""
    primary.acl_setuser("default", enabled=True, commands=["-psync", "-sync"], reset=False)
    primary.client_kill_filter(_type="replica")
    for replica in replicas:
        wait_sentinel(lambda replica=replica: replica.info("replication")["master_link_status"] == "down", "cut")


@contextmanager
def deployment(topology: str, tmp: Path) -> Iterator[Deployment]:
    if topology == "sentinel":
        group = SentinelGroup(tmp / "sentinel", replicas=2)
        try:

            def kill_sentinel_primary() -> None:
                old = group.primary.port
                group.primary.kill()
                wait_sentinel(lambda: group.master_port() != old, "the sentinels promote a replica")

            def cut() -> None:
                cut_replicas(group.primary.client(), [replica.client() for replica in group.replicas])

            yield Deployment(group.url, [], kill_sentinel_primary, cut)
        finally:
            group.stop()
        return
    # Without replica migration: otherwise the killed primary's spare replica can move to a primary that has none,
    # and leave the promoted one without a replica (so `--durability replicas` refuses writes until one is added).
    cluster = Cluster(
        tmp / "cluster",
        primaries=PRIMARIES,
        replicated=[KILLED, KILLED],
        node_timeout_ms=FAILOVER_NODE_TIMEOUT_MS,
        extra=["--cluster-allow-replica-migration", "no"],
    )
    try:

        def kill_cluster_primary() -> None:
            cluster.primaries[KILLED].kill()
            cluster.wait_for_promotion(KILLED)

        def cut_cluster() -> None:
            replicas = [replica.client() for replica in cluster.replicas_of[KILLED]]
            cut_replicas(cluster.primaries[KILLED].client(), replicas)

        yield Deployment(cluster.url, ["--redis-cluster"], kill_cluster_primary, cut_cluster)
    finally:
        cluster.stop()


def run(topology: str, link: str, durability: str, fail_mode: str, args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with deployment(topology, tmp) as redis_deployment:
            sidecar_flags = [*redis_deployment.flags, "--fail-mode", fail_mode, "--durability", durability]
            with sidecar(tmp, redis_deployment.url, *sidecar_flags) as addr:
                load = Load()
                stop = threading.Event()
                tenants = tenants_on_killed_primary(args.threads)
                threads = [
                    threading.Thread(target=drive, args=(addr, tenant, args, load, stop), daemon=True)
                    for tenant in tenants
                ]
                for thread in threads:
                    thread.start()
                time.sleep(args.before)
                disturbed_at = time.monotonic()
                if link == "cut":
                    redis_deployment.cut()
                    time.sleep(args.cut_ms / 1000)
                killed_at = time.monotonic()
                redis_deployment.kill()
                time.sleep(args.after)
                stop.set()
                for thread in threads:
                    thread.join(60)
                settle(addr, load)
                lost = lost_usage(addr, load)
    return summarize(Run(topology, link, durability, fail_mode), load, disturbed_at, killed_at, lost, args)


@dataclass(frozen=True)
class Run:
    topology: str
    link: str  # "up": the replicas are in sync at the kill; "cut": their link was cut --cut-ms before it
    durability: str
    fail_mode: str


def summarize(
    run: Run, load: Load, disturbed_at: float, killed_at: float, lost: int, args: argparse.Namespace
) -> Result:
    after = sorted((sample for sample in load.checks if sample.answered >= disturbed_at), key=lambda s: s.answered)
    not_decided = [sample for sample in after if sample.outcome != "store"]
    if not_decided:
        outage_began = not_decided[0].answered
        # The outage ends with the last check not decided by the store that another follows within a second: one
        # stray fail-mode answer later (a slow moment of a busy machine) is counted, but does not stretch it.
        recovered = next(
            (one.answered for one, then in pairwise(not_decided) if then.answered - one.answered > 1.0),
            not_decided[-1].answered,
        )
        first_decided = min(
            (sample.answered for sample in after if sample.outcome == "store" and sample.answered > outage_began),
            default=float("nan"),
        )
    else:
        recovered = first_decided = killed_at
    outage = [sample for sample in after if sample.sent <= recovered]
    deadline_s = args.deadline_ms / 1000
    in_deadline = [
        sample
        for sample in outage
        if sample.outcome in ("store", "fail-mode") and sample.answered - sample.sent <= deadline_s
    ]
    overspend = sum(max(0, granted - args.ceiling) for granted in load.granted.values())
    # What the primary acknowledged while its replicas could not receive it (the link cut, to the kill): reservations
    # granted and reports applied. A failover can lose at most this, and so over-grant at most this.
    unreplicated = sum(s.granted for s in load.checks if disturbed_at <= s.answered <= killed_at) + sum(
        tokens for at, tokens in load.report_acks if disturbed_at <= at <= killed_at
    )
    latencies = [sample.answered - sample.sent for sample in load.checks]
    return Result(
        run=run,
        checks=len(load.checks),
        outage_checks=len(outage),
        in_deadline=len(in_deadline) / len(outage) if outage else 1.0,
        fail_mode_answers=sum(1 for sample in load.checks if sample.outcome == "fail-mode"),
        first_decided_s=first_decided - killed_at,
        recovered_s=recovered - killed_at,
        overspend=overspend,
        fail_open_tokens=sum(sample.fail_open_tokens for sample in load.checks),
        unreplicated=unreplicated,
        lost=lost,
        reports_failed=load.reports_failed,
        check_p99_ms=percentile(latencies, 0.99) * 1000,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=4, help="client threads (one tenant each)")
    parser.add_argument("--before", type=float, default=3.0, help="seconds of load before the kill")
    parser.add_argument("--after", type=float, default=12.0, help="seconds of load after the kill")
    parser.add_argument("--deadline-ms", type=int, default=1000, help="each check's gRPC deadline")
    parser.add_argument("--ceiling", type=int, default=1000, help="each task's ceiling in tokens")
    parser.add_argument("--step", type=int, default=100, help="tokens per step")
    parser.add_argument("--topologies", default="sentinel,cluster")
    parser.add_argument("--durabilities", default="none,replicas")
    parser.add_argument("--fail-modes", default="closed,open")
    parser.add_argument("--links", default="up,cut", help="up: replicas in sync at the kill; cut: link cut before it")
    parser.add_argument("--cut-ms", type=int, default=1000, help="how long before the kill the link is cut")
    parser.add_argument("--write", type=Path, default=None, help="write the result into this Markdown file")
    args = parser.parse_args()

    results = []
    for topology in args.topologies.split(","):
        for link in args.links.split(","):
            for durability in args.durabilities.split(","):
                for fail_mode in args.fail_modes.split(","):
                    result = run(topology, link, durability, fail_mode, args)
                    print(result, file=sys.stderr, flush=True)
                    results.append(result)

    command = (
        f"`.venv/bin/python bench/failover.py --threads {args.threads} --before {args.before:g} "
        f"--after {args.after:g} --deadline-ms {args.deadline_ms} --ceiling {args.ceiling} --step {args.step} "
        f"--cut-ms {args.cut_ms}`"
    )
    lines = [
        f"### Failover under load: Sentinel and Cluster ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Command: {command}. {args.threads} client threads (one tenant each, on the primary "
        f"that is killed), tasks of {args.ceiling} tokens in steps of {args.step}, each allowed step reported; the "
        f"primary is SIGKILLed after {args.before:g} s of load, and the load goes on for {args.after:g} s. Sentinel: "
        "primary, 2 replicas, 3 sentinels, down-after 1000 ms; Cluster: 3 primaries, 2 replicas for the killed one, "
        "cluster-node-timeout 1000 ms, cluster-allow-replica-migration no. *link cut*: the primary dropped its "
        "replicas and refused them again "
        f"{args.cut_ms} ms before the kill, so the promoted replica lacks that time's writes. The sidecar's check "
        "deadline is the production 250 ms. Times are from the kill.",
        "",
        "| Redis | replicas at the kill | `--durability` | fail mode | checks | during the outage "
        "| answered in deadline | fail-mode answers | first decided s | recovered s | acknowledged unreplicated "
        "| overspend tokens "
        "| fail-open tokens | acknowledged usage lost | reports refused | check p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r.run.topology} | {LINKS[r.run.link]} | `{r.run.durability}` | {r.run.fail_mode} | {r.checks:,} | "
            f"{r.outage_checks:,} | {r.in_deadline:.1%} | {r.fail_mode_answers:,} | {r.first_decided_s:.2f} | "
            f"{r.recovered_s:.2f} | {r.unreplicated:,} | {r.overspend:,} | {r.fail_open_tokens:,} | {r.lost:,} | "
            f"{r.reports_failed} | {r.check_p99_ms:.0f} |"
            for r in results
        ),
        "",
    ]
    publish(lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
