"""Credentials for the admin API (issue 14): bearer tokens and client certificates named in an admin tokens file,
roles and tenant scopes checked per call, refusals and changes recorded in the audit trail. Real sidecar, real Valkey,
real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from budgetwarden.app import Sidecar
from budgetwarden.store import read_audit
from budgetwarden.transport._admin import RPC_ROLES
from budgetwarden.transport._auth import Role
from budgetwarden_api.v1 import admin_pb2 as admin_pb

from support import RunningSidecar, free_port, sidecar_settings
from support_admin import TWO_TENANTS_POLICY, Admin, TokensFile, open_checkpoint, requests_for
from support_tls import Authority

OK, DENIED, UNAUTH = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
def tokens(tmp_path: Path) -> TokensFile:
    return TokensFile(tmp_path / "admin-tokens.json")


@pytest.fixture
def secured(
    tmp_path: Path, tokens: TokensFile, start_sidecar: Callable[..., RunningSidecar]
) -> Callable[..., RunningSidecar]:
    def start(**settings: Any) -> RunningSidecar:
        policy = tmp_path / "policy.yaml"
        policy.write_text(TWO_TENANTS_POLICY)
        values = {"admin_listen": f"127.0.0.1:{free_port()}", "admin_tokens_file": tokens.path, "policy_file": policy}
        return start_sidecar(**(values | settings))

    return start


def admin_addr(running: RunningSidecar) -> str:
    assert running.settings.admin_listen
    return running.settings.admin_listen


def test_every_role_and_scope_against_every_call(tokens: TokensFile, secured: Callable[..., RunningSidecar]) -> None:
    """The table: each role, scoped to acme or to every tenant, calls each RPC on acme and on globex; no credentials
    and an unknown token are UNAUTHENTICATED everywhere."""
    callers = {
        f"{role}-acme": (tokens.add(f"{role}-acme", role, ["acme"]), Role[role.upper()], {"acme"})
        for role in ("viewer", "approver", "admin")
    } | {
        f"{role}-all": (tokens.add(f"{role}-all", role, "*"), Role[role.upper()], {"acme", "globex"})
        for role in ("viewer", "approver", "admin")
    }
    running = secured()
    table = []
    for name, (token, role, scope) in callers.items():
        for tenant in ("acme", "globex"):
            for rpc, request in requests_for(tenant).items():
                expected = OK if role >= RPC_ROLES[rpc] and tenant in scope else DENIED
                table.append((name, token, tenant, rpc, request, expected))
    for rpc, request in requests_for("acme").items():
        table.append(("nobody", None, "acme", rpc, request, UNAUTH))
        table.append(("forger", "bwat_not-a-token-anyone-was-given", "acme", rpc, request, UNAUTH))
    assert len(table) == 6 * 6 * 2 + 6 * 2
    wrong = []
    with grpc.insecure_channel(admin_addr(running)) as channel:
        for name, token, tenant, rpc, request, expected in table:
            got = Admin(channel, token).code(rpc, request)
            if got != expected:
                wrong.append(f"{name} {rpc} on {tenant}: {got.name}, expected {expected.name}")
    assert not wrong, "\n".join(wrong)


def test_an_approver_of_acme_cannot_approve_a_real_checkpoint_of_globex(
    tokens: TokensFile, secured: Callable[..., RunningSidecar], sync_redis: redis.Redis
) -> None:
    alice = tokens.add("alice", "approver", ["acme"])
    running = secured()
    theirs = open_checkpoint(running.addr, "globex", "their-task")
    ours = open_checkpoint(running.addr, "acme", "our-task")
    with grpc.insecure_channel(admin_addr(running)) as channel:
        admin = Admin(channel, alice)
        with pytest.raises(grpc.RpcError) as refused:
            admin.call("ApproveCheckpoint", admin_pb.ApproveCheckpointRequest(checkpoint_id=theirs, add_tokens=10**6))
        assert refused.value.code() == DENIED  # type: ignore[attr-defined]
        assert "globex" in refused.value.details()  # type: ignore[attr-defined]
        answer = admin.call("ApproveCheckpoint", admin_pb.ApproveCheckpointRequest(checkpoint_id=ours, add_tokens=100))
        assert answer.outcome == admin_pb.CHECKPOINT_OUTCOME_APPROVED
    # globex's checkpoint is still open: nothing of the refused call reached its task.
    listed = Admin(grpc.insecure_channel(admin_addr(running)), tokens.add("root", "admin", "*")).call(
        "ListCheckpoints", admin_pb.ListCheckpointsRequest(tenant_id="globex")
    )
    assert [c.checkpoint_id for c in listed.checkpoints] == [theirs]


def test_a_malformed_authorization_header_is_unauthenticated_and_no_token_is_logged(
    tokens: TokensFile, secured: Callable[..., RunningSidecar], caplog: pytest.LogCaptureFixture
) -> None:
    token = tokens.add("alice", "viewer", ["acme"])
    running = secured()
    request = admin_pb.GetTenantWindowsRequest(tenant_id="acme")
    with grpc.insecure_channel(admin_addr(running)) as channel:
        stub = Admin(channel).stub
        for header in (f"Basic {token}", "Bearer ", token):
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetTenantWindows(request, timeout=30, metadata=[("authorization", header)])
            assert refused.value.code() == UNAUTH, header  # type: ignore[attr-defined]
        wrong = token[:-4] + "AAAA"
        assert Admin(channel, wrong).code("GetTenantWindows", request) == UNAUTH
        assert Admin(channel, token).code("GetTenantWindows", request) == OK
    assert token not in caplog.text
    assert wrong not in caplog.text


def test_a_changed_tokens_file_applies_at_the_next_call(
    tokens: TokensFile, secured: Callable[..., RunningSidecar]
) -> None:
    """Checked per call (its stamp), not on a timer: no wait between the change and the call that sees it."""
    alice = tokens.add("alice", "viewer", ["acme"])
    running = secured()
    request = admin_pb.GetTenantWindowsRequest(tenant_id="acme")
    with grpc.insecure_channel(admin_addr(running)) as channel:
        bob = tokens.add("bob", "viewer", ["acme"])  # added while running
        assert Admin(channel, bob).code("GetTenantWindows", request) == OK
        tokens.tokens = [entry for entry in tokens.tokens if entry["name"] != "alice"]  # revoked
        tokens.write()
        assert Admin(channel, alice).code("GetTenantWindows", request) == UNAUTH
        tokens.path.write_text("tokens: [ {name: broken")  # a bad file: the previous one stays in force
        assert Admin(channel, bob).code("GetTenantWindows", request) == OK
        assert Admin(channel, alice).code("GetTenantWindows", request) == UNAUTH


def test_a_client_certificate_is_an_identity_by_its_san(
    tmp_path: Path, tokens: TokensFile, secured: Callable[..., RunningSidecar]
) -> None:
    authority = Authority(tmp_path / "ca")
    served = authority.issue("admin-server")
    tokens.add_client("console", "console.ops.example", "viewer", ["acme"])
    running = secured(tls_cert_file=served.cert, tls_key_file=served.key, tls_client_ca_file=authority.ca_file)

    def channel_as(name: str) -> grpc.Channel:
        pair = authority.issue(name, client=True)  # its SAN is the DNS name `name`
        credentials = grpc.ssl_channel_credentials(
            authority.ca_file.read_bytes(), private_key=pair.key.read_bytes(), certificate_chain=pair.cert.read_bytes()
        )
        return grpc.secure_channel(admin_addr(running), credentials)

    windows = admin_pb.GetTenantWindowsRequest(tenant_id="acme")
    with channel_as("console.ops.example") as channel:
        admin = Admin(channel)
        assert admin.code("GetTenantWindows", windows) == OK
        assert admin.code("GetTenantWindows", admin_pb.GetTenantWindowsRequest(tenant_id="globex")) == DENIED
        assert admin.code("ResetTask", admin_pb.ResetTaskRequest(tenant_id="acme", task_id="t")) == DENIED
    with channel_as("someone-else.example") as channel:  # signed by the CA, but not named in the file
        assert Admin(channel).code("GetTenantWindows", windows) == UNAUTH


def test_changes_and_refusals_are_in_the_audit_trail(
    tokens: TokensFile, secured: Callable[..., RunningSidecar], sync_redis: redis.Redis
) -> None:
    alice = tokens.add("alice", "approver", ["acme"])
    running = secured()
    ours = open_checkpoint(running.addr, "acme", "our-task")
    theirs = open_checkpoint(running.addr, "globex", "their-task")
    with grpc.insecure_channel(admin_addr(running)) as channel:
        admin = Admin(channel, alice)
        assert (
            admin.code("ApproveCheckpoint", admin_pb.ApproveCheckpointRequest(checkpoint_id=ours, add_tokens=200)) == OK
        )
        assert admin.code("ApproveCheckpoint", admin_pb.ApproveCheckpointRequest(checkpoint_id=theirs)) == DENIED
        assert Admin(channel).code("DenyCheckpoint", admin_pb.DenyCheckpointRequest(checkpoint_id=ours)) == UNAUTH

    acme = list(read_audit(sync_redis, "acme", 0))
    assert len(acme) == 1
    (approval,) = acme
    assert approval["rpc"] == "ApproveCheckpoint"
    assert approval["outcome"] == "APPROVED"
    assert (approval["who"], approval["role"], approval["via"]) == ("alice", "approver", "token")
    assert approval["peer"].startswith("ipv4:127.0.0.1:") or approval["peer"].startswith("ipv6:")
    assert approval["request"]["checkpoint_id"] == ours
    assert approval["before"]["limit_tokens"] == 100
    assert approval["after"]["limit_tokens"] == 300
    assert approval["time_ms"] == running.clock()

    (refused,) = read_audit(sync_redis, "globex", 0)
    assert refused["outcome"] == "PERMISSION_DENIED"
    assert refused["who"] == "alice"
    assert "globex" in refused["reason"]
    assert "before" not in refused

    everything = list(read_audit(sync_redis, None, 0))
    unauthenticated = [e for e in everything if e["outcome"] == "UNAUTHENTICATED"]
    assert len(unauthenticated) == 1
    assert unauthenticated[0]["rpc"] == "DenyCheckpoint"
    assert unauthenticated[0]["who"] == ""
    assert unauthenticated[0]["tenant_id"] == ""
    assert len(everything) == 3
    assert [e["stream_id"] for e in everything] == sorted(
        (e["stream_id"] for e in everything), key=lambda s: tuple(int(p) for p in s.split("-"))
    )


def test_an_admin_listener_beyond_loopback_needs_a_tokens_file(
    redis_url: str, tokens: TokensFile, start_sidecar: Callable[..., RunningSidecar]
) -> None:
    settings = sidecar_settings(redis_url, admin_listen=f"0.0.0.0:{free_port()}")
    with pytest.raises(OSError, match="is not a loopback address and no admin_tokens_file is set"):
        asyncio.run(Sidecar(settings).start())
    running = start_sidecar(admin_listen=f"0.0.0.0:{free_port()}", admin_tokens_file=tokens.path)
    assert running.sidecar is not None
    assert running.sidecar.admin_port


def test_a_bad_tokens_file_stops_the_start_with_one_line(redis_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "tokens.yaml"
    bad.write_text("tokens:\n  - {name: alice, sha256: nothex, role: approver, tenants: [acme]}\n")
    settings = sidecar_settings(redis_url, admin_listen=f"127.0.0.1:{free_port()}", admin_tokens_file=bad)
    with pytest.raises(OSError, match=r"admin_tokens_file: .*tokens\.0\.sha256"):
        asyncio.run(Sidecar(settings).start())
