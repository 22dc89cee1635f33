"""ListCheckpoints (issue 14): a tenant's open checkpoints oldest first, decided ones latest first, a page at a time
(AIP-158); the checkpoint index follows resets and expired tasks; the CLI's `checkpoints list`, `budget` text,
`admin-token new` and `audit export`. Real sidecar, real Valkey."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from budgetwarden.store import TenantKeys, read_audit
from budgetwarden.transport import token_digest
from budgetwarden_api.v1 import admin_pb2 as admin_pb

from support import RunningSidecar, free_port
from support import run_cli as cli
from support_admin import TWO_TENANTS_POLICY, Admin, TokensFile, open_checkpoint

OPEN, DECIDED = admin_pb.CHECKPOINT_FILTER_OPEN, admin_pb.CHECKPOINT_FILTER_DECIDED


@pytest.fixture
def running(tmp_path: Path, start_sidecar: Callable[..., RunningSidecar]) -> RunningSidecar:
    policy = tmp_path / "policy.yaml"
    policy.write_text(TWO_TENANTS_POLICY)
    return start_sidecar(policy_file=policy, admin_listen=f"127.0.0.1:{free_port()}")


def admin_of(running: RunningSidecar) -> Admin:
    assert running.settings.admin_listen
    return Admin(grpc.insecure_channel(running.settings.admin_listen))


def open_many(running: RunningSidecar, tenant: str, count: int) -> list[str]:
    """Checkpoints opened one second apart, except the last two, opened in the same millisecond (a tie)."""
    ids = []
    for n in range(count):
        if n < count - 1:
            running.clock.advance(1)  # type: ignore[attr-defined]
        ids.append(open_checkpoint(running.addr, tenant, f"task-{n}"))
    return ids


def list_all(admin: Admin, tenant: str, filter_: int, page_size: int) -> tuple[list[str], int]:
    """Every checkpoint, page by page; and how many pages it took."""
    ids: list[str] = []
    token, pages = "", 0
    while True:
        request = admin_pb.ListCheckpointsRequest(
            tenant_id=tenant, filter=filter_, page_size=page_size, page_token=token
        )
        answer = admin.call("ListCheckpoints", request)
        pages += 1
        assert len(answer.checkpoints) <= page_size
        ids += [c.checkpoint_id for c in answer.checkpoints]
        token = answer.next_page_token
        if not token:
            return ids, pages
        assert pages < 50, "paging does not end"


def test_open_checkpoints_are_listed_oldest_first_a_page_at_a_time(running: RunningSidecar) -> None:
    opened = open_many(running, "acme", 7)
    open_many(running, "globex", 2)  # another tenant's are not listed
    admin = admin_of(running)
    ids, pages = list_all(admin, "acme", OPEN, 3)
    tie = sorted(opened[-2:])  # equal times: in id order, as the index orders them
    assert ids == opened[:-2] + tie
    assert pages == 3
    first = admin.call("ListCheckpoints", admin_pb.ListCheckpointsRequest(tenant_id="acme")).checkpoints[0]
    assert (first.checkpoint_id, first.tenant_id, first.task_id, first.task_type) == (
        opened[0],
        "acme",
        "task-0",
        "gate",
    )
    assert first.state == admin_pb.CHECKPOINT_STATE_OPEN
    assert not first.HasField("decided_at")
    assert first.task.limit_tokens == 100


def test_decided_checkpoints_are_listed_latest_first_with_what_was_added(running: RunningSidecar) -> None:
    opened = open_many(running, "acme", 5)
    admin = admin_of(running)
    for n, checkpoint in enumerate(opened):
        running.clock.advance(1)  # type: ignore[attr-defined]
        if n % 2 == 0:
            request = admin_pb.ApproveCheckpointRequest(checkpoint_id=checkpoint, add_tokens=1000 + n)
            assert admin.call("ApproveCheckpoint", request).outcome == admin_pb.CHECKPOINT_OUTCOME_APPROVED
        else:
            assert admin.call("DenyCheckpoint", admin_pb.DenyCheckpointRequest(checkpoint_id=checkpoint)).outcome == (
                admin_pb.CHECKPOINT_OUTCOME_DENIED
            )
    assert list_all(admin, "acme", OPEN, 2) == ([], 1)
    ids, pages = list_all(admin, "acme", DECIDED, 2)
    assert ids == list(reversed(opened))
    assert pages == 3
    decided = admin.call("ListCheckpoints", admin_pb.ListCheckpointsRequest(tenant_id="acme", filter=DECIDED))
    by_id = {c.checkpoint_id: c for c in decided.checkpoints}
    approved, denied = by_id[opened[0]], by_id[opened[1]]
    assert (approved.state, approved.added_tokens, approved.task.limit_tokens) == (
        admin_pb.CHECKPOINT_STATE_APPROVED,
        1000,
        1100,
    )
    assert approved.decided_at.ToMilliseconds() > approved.opened_at.ToMilliseconds()
    assert (denied.state, denied.added_tokens) == (admin_pb.CHECKPOINT_STATE_DENIED, 0)


def test_the_checkpoint_index_expires_with_the_task_retention(running: RunningSidecar, sync_redis: redis.Redis) -> None:
    (opened,) = open_many(running, "acme", 1)
    keys = TenantKeys("acme")
    info = f"{keys.prefix}ckpt:{hashlib.sha1(opened.encode()).hexdigest()}"
    retention_ms = running.settings.task_retention_seconds * 1000
    for key in (keys.checkpoints_open, info):
        assert 0 < sync_redis.pttl(key) <= retention_ms, key
    admin_of(running).call("DenyCheckpoint", admin_pb.DenyCheckpointRequest(checkpoint_id=opened))
    for key in (keys.checkpoints_decided, info):
        assert 0 < sync_redis.pttl(key) <= retention_ms, key
    assert sync_redis.hget(info, "state") == b"denied"


def test_a_reset_or_expired_task_leaves_the_open_list(running: RunningSidecar, sync_redis: redis.Redis) -> None:
    opened = open_many(running, "acme", 3)
    admin = admin_of(running)
    assert admin.call("ResetTask", admin_pb.ResetTaskRequest(tenant_id="acme", task_id="task-0")).existed
    sync_redis.delete(TenantKeys("acme").task("task-1"))  # as if it expired
    assert list_all(admin, "acme", OPEN, 10) == ([opened[2]], 1)
    assert sync_redis.zrange(TenantKeys("acme").checkpoints_open, 0, -1) == [opened[2].encode()]  # dropped from it


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"page_size": -1}, "page_size: must not be negative"),
        ({"page_token": "not-a-token"}, "page_token: is not a next_page_token"),
        ({"filter": 7}, "filter: is not a CheckpointFilter"),
        ({"tenant_id": ""}, "tenant_id: is required"),
    ],
)
def test_bad_list_requests_name_the_field(running: RunningSidecar, change: dict[str, Any], message: str) -> None:
    request = admin_pb.ListCheckpointsRequest(**({"tenant_id": "acme"} | change))
    with pytest.raises(grpc.RpcError) as refused:
        admin_of(running).call("ListCheckpoints", request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert message in refused.value.details()  # type: ignore[attr-defined]


def test_a_page_token_holds_for_its_tenant_and_filter_only(running: RunningSidecar) -> None:
    open_many(running, "acme", 3)
    admin = admin_of(running)
    token = admin.call(
        "ListCheckpoints", admin_pb.ListCheckpointsRequest(tenant_id="acme", page_size=1)
    ).next_page_token
    assert token
    for other in ({"tenant_id": "globex"}, {"tenant_id": "acme", "filter": DECIDED}):
        with pytest.raises(grpc.RpcError) as refused:
            admin.call("ListCheckpoints", admin_pb.ListCheckpointsRequest(page_token=token, **other))
        assert "page_token: was issued for another tenant_id or filter" in refused.value.details()  # type: ignore[attr-defined]


def test_page_sizes_beyond_the_most_are_taken_as_the_most(running: RunningSidecar) -> None:
    open_many(running, "acme", 2)
    answer = admin_of(running).call(
        "ListCheckpoints", admin_pb.ListCheckpointsRequest(tenant_id="acme", page_size=10**6)
    )
    assert len(answer.checkpoints) == 2
    assert not answer.next_page_token


# --- the command line ---------------------------------------------------------------------------------------------


def test_checkpoints_list_and_budget_show_open_checkpoints_and_closed_tasks(running: RunningSidecar) -> None:
    opened = open_many(running, "acme", 3)
    addr = running.settings.admin_listen
    assert addr
    text = cli("checkpoints", "list", "--tenant", "acme", "--admin-addr", addr, "--page-size", "2")
    assert text.returncode == 0, text.stderr
    assert [line.split()[0] for line in text.stdout.splitlines()[1:]] == (opened[:1] + sorted(opened[1:]))[:2]
    assert "more: --page-token " in text.stderr
    every = cli("checkpoints", "list", "--tenant", "acme", "--admin-addr", addr, "--page-size", "2", "--all", "--json")
    listed = json.loads(every.stdout)
    assert [c["checkpoint_id"] for c in listed["checkpoints"]] == opened[:1] + sorted(opened[1:])
    assert listed["next_page_token"] == ""

    budget = cli("budget", "--tenant", "acme", "--task", "task-0", "--addr", running.addr)
    assert f"open checkpoint: {opened[0]}" in budget.stdout
    assert cli("deny", opened[0], "--admin-addr", addr).returncode == 0
    closed = cli("budget", "--tenant", "acme", "--task", "task-0", "--addr", running.addr)
    assert "task closed" in closed.stdout
    assert "open checkpoint" not in closed.stdout
    decided = cli("checkpoints", "list", "--tenant", "acme", "--decided", "--admin-addr", addr)
    assert decided.stdout.splitlines()[1].split()[:2] == [opened[0], "task-0"]
    assert " denied " in decided.stdout


def test_admin_token_new_prints_the_token_once_and_its_file_entry() -> None:
    made = cli("admin-token", "new", "--name", "alice", "--role", "approver", "--tenant", "acme", "--tenant", "globex")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("bwat_")
    assert token not in made.stderr
    entry = json.loads(made.stderr.splitlines()[-1].strip().removeprefix("- "))
    assert entry == {"name": "alice", "sha256": token_digest(token), "role": "approver", "tenants": ["acme", "globex"]}


def test_the_cli_reaches_a_secured_admin_api_with_a_token_file(
    tmp_path: Path, start_sidecar: Callable[..., RunningSidecar], redis_url: str
) -> None:
    tokens = TokensFile(tmp_path / "tokens.json")
    alice = tokens.add("alice", "approver", ["acme"])
    policy = tmp_path / "policy.yaml"
    policy.write_text(TWO_TENANTS_POLICY)
    addr = f"127.0.0.1:{free_port()}"
    running = start_sidecar(policy_file=policy, admin_listen=addr, admin_tokens_file=tokens.path)
    checkpoint = open_checkpoint(running.addr, "acme", "t")
    anonymous = cli("approve", checkpoint, "--admin-addr", addr)
    assert anonymous.returncode == 1
    assert "UNAUTHENTICATED" in anonymous.stderr
    assert "--token-file" in anonymous.stderr
    token_file = tmp_path / "alice.token"
    token_file.write_text(alice + "\n")
    approved = cli("approve", checkpoint, "--add", "50", "--admin-addr", addr, "--token-file", str(token_file))
    assert approved.returncode == 0, approved.stderr
    assert approved.stdout.startswith("APPROVED")
    listed = cli(
        "checkpoints", "list", "--tenant", "globex", "--admin-addr", addr, env={"BUDGETWARDEN_ADMIN_TOKEN": alice}
    )
    assert listed.returncode == 1
    assert "PERMISSION_DENIED" in listed.stderr

    exported = tmp_path / "audit.jsonl"
    result = cli("audit", "export", "--since", "1d", "--redis-url", redis_url, "--output", str(exported))
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [(e["rpc"], e["outcome"], e["who"]) for e in entries] == [
        ("ApproveCheckpoint", "UNAUTHENTICATED", ""),
        ("ApproveCheckpoint", "APPROVED", "alice"),
        ("ListCheckpoints", "PERMISSION_DENIED", "alice"),
    ]
    assert alice not in exported.read_text()
    only_acme = cli("audit", "export", "--since", "1d", "--tenant", "acme", "--redis-url", redis_url)
    assert [json.loads(line)["outcome"] for line in only_acme.stdout.splitlines()] == ["APPROVED"]
    assert cli("audit", "export", "--since", "1d", "--until", "1d", "--redis-url", redis_url).stdout == ""


def test_a_loopback_admin_listener_without_a_tokens_file_records_its_local_caller(
    running: RunningSidecar, sync_redis: redis.Redis
) -> None:
    (opened,) = open_many(running, "acme", 1)
    admin_of(running).call("ApproveCheckpoint", admin_pb.ApproveCheckpointRequest(checkpoint_id=opened, add_tokens=5))
    (entry,) = read_audit(sync_redis, "acme", 0)
    assert (entry["who"], entry["role"], entry["via"], entry["outcome"]) == ("local", "admin", "none", "APPROVED")
