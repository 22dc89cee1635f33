"""The web console (issue 14) over real sockets, without a browser: a control plane serving it against the test's
Valkey, a sidecar whose check opened a checkpoint. Logging in, roles and tenant scopes as the admin API has them, CSRF,
revocation, the cookie's flags, TLS, and the audit trail of every action and refusal. (The browser test is
tests/system/test_console_browser.py.)"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis

from budgetwarden.console import SESSION_COOKIE
from budgetwarden.store import read_audit
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_api.v1 import budget_pb2_grpc

from support import RunningSidecar, SettableClock, free_port
from support_admin import TokensFile, open_checkpoint
from support_console import RunningControlPlane, csrf_of, logged_in, start_control_plane, two_tenants
from support_tls import Authority


@pytest.fixture
def tokens(tmp_path: Path) -> TokensFile:
    return TokensFile(tmp_path / "admin-tokens.json")


@pytest.fixture
def planes() -> Iterator[list[RunningControlPlane]]:
    started: list[RunningControlPlane] = []
    yield started
    for plane in started:
        plane.stop()


@pytest.fixture
def setup(
    tmp_path: Path,
    redis_url: str,
    tokens: TokensFile,
    planes: list[RunningControlPlane],
    start_sidecar: Callable[..., RunningSidecar],
) -> Callable[..., tuple[RunningSidecar, RunningControlPlane]]:
    def start(**overrides: Any) -> tuple[RunningSidecar, RunningControlPlane]:
        policy = two_tenants(tmp_path)
        sidecar = start_sidecar(policy_file=policy)
        plane = start_control_plane(redis_url, tokens, policy, sidecar.clock, **overrides)
        planes.append(plane)
        return sidecar, plane

    return start


def check(sidecar: RunningSidecar, tenant: str, task: str) -> Any:
    request = pb.CheckRequest(tenant_id=tenant, task_id=task, step_id="s1", estimated_input_tokens=150)
    with grpc.insecure_channel(sidecar.addr) as channel:
        return budget_pb2_grpc.BudgetServiceStub(channel).Check(request, timeout=30)


def audit(sync_redis: redis.Redis, tenant: str | None) -> list[dict[str, Any]]:
    return list(read_audit(sync_redis, tenant, 0))


def test_an_approver_sees_approves_and_the_task_goes_on(
    setup: Callable[..., tuple[RunningSidecar, RunningControlPlane]], tokens: TokensFile, sync_redis: redis.Redis
) -> None:
    alice = tokens.add("alice", "approver", ["acme"])
    sidecar, plane = setup()
    mine = open_checkpoint(sidecar.addr, "acme", "task-a")
    theirs = open_checkpoint(sidecar.addr, "globex", "task-g")
    browser, page = logged_in(plane.console_url, alice)
    assert mine in page
    assert theirs not in page, "a checkpoint of a tenant outside alice's scope is shown"
    assert "globex" not in page
    assert "/checkpoints/approve" in page
    assert 'id="tenants"' in page
    assert "day" in page

    answer = browser.post(
        "/checkpoints/approve",
        data={"csrf": csrf_of(page), "checkpoint_id": mine, "add_tokens": "1000", "add_usd": "0.5"},
        follow_redirects=True,
    )
    assert answer.status_code == 200, answer.text
    assert f"{mine}: approved" in answer.text
    assert f'data-checkpoint="{mine}"' not in answer.text, "the approved checkpoint is still listed open"
    assert check(sidecar, "acme", "task-a").decision == pb.DECISION_ALLOW

    (entry,) = [e for e in audit(sync_redis, "acme") if e["rpc"] == "ApproveCheckpoint"]
    assert entry["who"] == "alice"
    assert entry["role"] == "approver"
    assert entry["via"] == "token"
    assert entry["outcome"] == "APPROVED"
    assert entry["request"] == {"checkpoint_id": mine, "add_tokens": "1000", "add_usd_micros": "500000"}
    assert entry["peer"].startswith("console 127.0.0.1:")
    assert entry["before"]["limit_tokens"] == 100
    assert entry["after"]["limit_tokens"] == 1100
    assert "ApproveCheckpoint" in browser.get("/").text  # recent decisions
    assert alice not in str(audit(sync_redis, None))


def test_deny_closes_the_checkpoint(
    setup: Callable[..., tuple[RunningSidecar, RunningControlPlane]], tokens: TokensFile, sync_redis: redis.Redis
) -> None:
    bob = tokens.add("bob", "admin", "*")
    sidecar, plane = setup()
    checkpoint = open_checkpoint(sidecar.addr, "globex", "task-d")
    browser, page = logged_in(plane.console_url, bob)
    answer = browser.post(
        "/checkpoints/deny", data={"csrf": csrf_of(page), "checkpoint_id": checkpoint}, follow_redirects=True
    )
    assert f"{checkpoint}: denied" in answer.text
    assert check(sidecar, "globex", "task-d").decision == pb.DECISION_DENY
    (entry,) = [e for e in audit(sync_redis, "globex") if e["rpc"] == "DenyCheckpoint"]
    assert entry["who"] == "bob"
    assert entry["outcome"] == "DENIED"


def test_a_viewer_sees_but_has_no_buttons_and_is_refused_on_post(
    setup: Callable[..., tuple[RunningSidecar, RunningControlPlane]], tokens: TokensFile, sync_redis: redis.Redis
) -> None:
    vera = tokens.add("vera", "viewer", "*")
    sidecar, plane = setup()
    checkpoint = open_checkpoint(sidecar.addr, "acme", "task-v")
    browser, page = logged_in(plane.console_url, vera)
    assert checkpoint in page
    assert "/checkpoints/approve" not in page
    assert "/checkpoints/deny" not in page
    answer = browser.post(
        "/checkpoints/approve", data={"csrf": csrf_of(page), "checkpoint_id": checkpoint, "add_tokens": "1000"}
    )
    assert answer.status_code == 403
    assert "needs the role approver" in answer.text
    assert check(sidecar, "acme", "task-v").decision == pb.DECISION_CHECKPOINT, "the refused approval changed the task"
    (entry,) = [e for e in audit(sync_redis, "acme") if e["rpc"] == "ApproveCheckpoint"]
    assert entry["who"] == "vera"
    assert entry["outcome"] == "PERMISSION_DENIED"


def test_an_approver_of_one_tenant_cannot_decide_another_tenants_checkpoint(
    setup: Callable[..., tuple[RunningSidecar, RunningControlPlane]], tokens: TokensFile, sync_redis: redis.Redis
) -> None:
    alice = tokens.add("alice", "approver", ["acme"])
    sidecar, plane = setup()
    theirs = open_checkpoint(sidecar.addr, "globex", "task-x")
    browser, page = logged_in(plane.console_url, alice)
    for action in ("approve", "deny"):
        answer = browser.post(f"/checkpoints/{action}", data={"csrf": csrf_of(page), "checkpoint_id": theirs})
        assert answer.status_code == 403, answer.text
        assert "may not act on tenant &#39;globex&#39;" in answer.text
    assert check(sidecar, "globex", "task-x").decision == pb.DECISION_CHECKPOINT
    refused = [e for e in audit(sync_redis, "globex") if e["who"] == "alice"]
    assert [e["outcome"] for e in refused] == ["PERMISSION_DENIED", "PERMISSION_DENIED"]


@pytest.mark.parametrize("csrf", [None, "", "not-the-sessions-token"])
def test_an_action_without_the_sessions_csrf_token_is_refused(
    setup: Callable[..., tuple[RunningSidecar, RunningControlPlane]],
    tokens: TokensFile,
    sync_redis: redis.Redis,
    csrf: str | None,
) -> None:
    alice = tokens.add("alice", "approver", ["acme"])
    sidecar, plane = setup()
    checkpoint = open_checkpoint(sidecar.addr, "acme", "task-c")
    browser, _ = logged_in(plane.console_url, alice)
    form = {"checkpoint_id": checkpoint, "add_tokens": "1000"} | ({} if csrf is None else {"csrf": csrf})
    answer = browser.post("/checkpoints/approve", data=form)
    assert answer.status_code == 403
    assert "CSRF" in answer.text
    assert check(sidecar, "acme", "task-c").decision == pb.DECISION_CHECKPOINT
    (entry,) = [e for e in audit(sync_redis, "acme") if e["rpc"] == "ApproveCheckpoint"]
    assert entry["outcome"] == "PERMISSION_DENIED"
    assert "CSRF" in entry["reason"]


def test_logging_in_needs_a_known_token_and_a_refusal_is_recorded(
    setup: Callable[..., tuple[RunningSidecar, RunningControlPlane]], tokens: TokensFile, sync_redis: redis.Redis
) -> None:
    tokens.add("alice", "approver", ["acme"])
    _, plane = setup()
    with httpx.Client(base_url=plane.console_url, timeout=30) as browser:
        assert browser.get("/").headers["location"] == "/login"
        forged = "bwat_not-a-token-anyone-was-given"
        answer = browser.post("/login", data={"token": forged})
        assert answer.status_code == 401
        assert SESSION_COOKIE not in answer.cookies
        # Without a session an action is refused (and recorded), whatever the form says.
        refused = browser.post("/checkpoints/approve", data={"checkpoint_id": "ck1.YWNtZQ.dA.1", "csrf": "x"})
        assert refused.status_code == 401
    entries = audit(sync_redis, None)
    assert [e["outcome"] for e in entries] == ["UNAUTHENTICATED", "UNAUTHENTICATED"]
    assert entries[0]["rpc"] == "ConsoleLogin"
    assert forged not in str(entries)


def test_the_session_cookie_is_httponly_and_strict_and_a_revoked_token_ends_the_session(
    setup: Callable[..., tuple[RunningSidecar, RunningControlPlane]], tokens: TokensFile
) -> None:
    alice = tokens.add("alice", "approver", ["acme"])
    _, plane = setup()
    with httpx.Client(base_url=plane.console_url, timeout=30) as browser:
        answer = browser.post("/login", data={"token": alice})
        assert answer.status_code == 303
        cookie = answer.headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "samesite=strict" in cookie
        assert "secure" not in cookie  # plain HTTP on loopback: a Secure cookie would never be sent back
        assert alice not in answer.headers["set-cookie"]
        assert answer.headers["content-security-policy"].startswith("default-src 'none'")
        assert browser.get("/").status_code == 200
        tokens.tokens.clear()
        tokens.write()
        assert browser.get("/").headers["location"] == "/login"


def test_under_tls_the_console_serves_https_with_a_secure_cookie(
    tmp_path: Path, setup: Callable[..., tuple[RunningSidecar, RunningControlPlane]], tokens: TokensFile
) -> None:
    authority = Authority(tmp_path / "ca")
    server = authority.issue("server")
    alice = tokens.add("alice", "approver", ["acme"])
    _, plane = setup(tls_cert_file=server.cert, tls_key_file=server.key)
    assert plane.console_url.startswith("https://")
    trust = ssl.create_default_context(cafile=str(authority.ca_file))
    with httpx.Client(base_url=plane.console_url, timeout=30, verify=trust) as browser:
        answer = browser.post("/login", data={"token": alice})
        assert answer.status_code == 303
        assert "secure" in answer.headers["set-cookie"].lower()
    plain_url = plane.console_url.replace("https", "http")
    with httpx.Client(base_url=plain_url, timeout=30) as plain, pytest.raises(httpx.HTTPError):
        plain.get("/login")


def test_without_a_tokens_file_the_console_refuses_a_wider_listener(
    tmp_path: Path, redis_url: str, start_sidecar: Callable[..., RunningSidecar]
) -> None:
    sidecar = start_sidecar()
    with pytest.raises(OSError, match="admin_tokens_file"):
        start_control_plane(
            redis_url, None, two_tenants(tmp_path), sidecar.clock, console_listen=f"0.0.0.0:{free_port()}"
        )


def test_the_console_serves_a_renewed_certificate_at_the_next_handshake(
    tmp_path: Path, setup: Callable[..., tuple[RunningSidecar, RunningControlPlane]], tokens: TokensFile
) -> None:
    first, second = Authority(tmp_path / "first"), Authority(tmp_path / "second", name="renewed CA")
    served = first.issue("server")
    _, plane = setup(tls_cert_file=served.cert, tls_key_file=served.key)

    def answers(authority: Authority) -> bool:
        trust = ssl.create_default_context(cafile=str(authority.ca_file))
        try:
            with httpx.Client(base_url=plane.console_url, timeout=30, verify=trust) as browser:
                return browser.get("/login").status_code == 200
        except httpx.ConnectError:
            return False

    assert answers(first)
    assert not answers(second)
    renewed = second.issue("server-renewed")
    # As the kubelet swaps a mounted Secret: each file replaced whole.
    for source, target in ((renewed.cert, served.cert), (renewed.key, served.key)):
        staged = target.with_suffix(".new")
        staged.write_bytes(source.read_bytes())
        os.replace(staged, target)
    assert answers(second)
    assert not answers(first)


def test_with_a_client_ca_the_console_asks_a_client_certificate_then_a_token(
    tmp_path: Path, setup: Callable[..., tuple[RunningSidecar, RunningControlPlane]], tokens: TokensFile
) -> None:
    authority = Authority(tmp_path / "ca")
    served, client = authority.issue("server"), authority.issue("operator-laptop", client=True)
    alice = tokens.add("alice", "approver", ["acme"])
    _, plane = setup(tls_cert_file=served.cert, tls_key_file=served.key, tls_client_ca_file=authority.ca_file)
    without = ssl.create_default_context(cafile=str(authority.ca_file))
    with (
        httpx.Client(base_url=plane.console_url, timeout=30, verify=without) as browser,
        pytest.raises(httpx.HTTPError),
    ):
        browser.get("/login")
    with_certificate = ssl.create_default_context(cafile=str(authority.ca_file))
    with_certificate.load_cert_chain(client.cert, client.key)
    with httpx.Client(base_url=plane.console_url, timeout=30, verify=with_certificate) as browser:
        assert browser.get("/").headers["location"] == "/login"  # the certificate alone does not log in
        assert browser.post("/login", data={"token": alice}).status_code == 303


def test_live_tasks_are_the_ones_holding_a_reservation_within_the_callers_tenants(
    setup: Callable[..., tuple[RunningSidecar, RunningControlPlane]], tokens: TokensFile
) -> None:
    alice = tokens.add("alice", "viewer", ["acme"])
    sidecar, plane = setup()

    def allow(tenant: str, task: str, step: str, tokens_asked: int) -> None:
        request = pb.CheckRequest(tenant_id=tenant, task_id=task, step_id=step, estimated_input_tokens=tokens_asked)
        with grpc.insecure_channel(sidecar.addr) as channel:
            answer = budget_pb2_grpc.BudgetServiceStub(channel).Check(request, timeout=30)
        assert answer.decision == pb.DECISION_ALLOW, answer

    allow("acme", "worker-1", "s0", 30)
    allow("acme", "worker-1", "s1", 20)
    allow("globex", "worker-g", "s0", 10)
    browser, page = logged_in(plane.console_url, alice)
    assert 'data-task="worker-1"' in page
    assert "s0, s1" in page
    assert "50 / 100 tokens" in page
    assert "worker-g" not in page
    assert isinstance(sidecar.clock, SettableClock)
    sidecar.clock.advance(3600)  # past every lease: nothing holds budget any more
    assert 'data-task="worker-1"' not in browser.get("/").text


def test_a_form_posted_from_another_origin_is_refused_login_included(
    setup: Callable[..., tuple[RunningSidecar, RunningControlPlane]], tokens: TokensFile, sync_redis: redis.Redis
) -> None:
    alice = tokens.add("alice", "approver", ["acme"])
    sidecar, plane = setup()
    checkpoint = open_checkpoint(sidecar.addr, "acme", "task-o")
    evil = {"origin": "https://evil.example"}
    with httpx.Client(base_url=plane.console_url, timeout=30) as browser:
        answer = browser.post("/login", data={"token": alice}, headers=evil)
        assert answer.status_code == 403
        assert SESSION_COOKIE not in answer.cookies
    browser, page = logged_in(plane.console_url, alice)
    form = {"csrf": csrf_of(page), "checkpoint_id": checkpoint, "add_tokens": "10"}
    assert browser.post("/checkpoints/approve", data=form, headers=evil).status_code == 403
    assert check(sidecar, "acme", "task-o").decision == pb.DECISION_CHECKPOINT
    own = {"origin": plane.console_url}
    assert browser.post("/checkpoints/approve", data=form, headers=own).status_code == 303
    refused = [e for e in audit(sync_redis, None) if e["rpc"] == "ConsolePost"]
    assert len(refused) == 2
    assert "evil.example" in refused[0]["reason"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("add_tokens", "-5"), ("add_tokens", "1e3"), ("add_tokens", "99999999999999999999"), ("add_usd", "nan"),
     ("add_usd", "0.0000001"), ("add_usd", "-1"), ("add_usd", "dollars")],
)  # fmt: skip
def test_a_bad_amount_is_refused_naming_the_field_and_changes_nothing(
    setup: Callable[..., tuple[RunningSidecar, RunningControlPlane]], tokens: TokensFile, field: str, value: str
) -> None:
    alice = tokens.add("alice", "approver", ["acme"])
    sidecar, plane = setup()
    checkpoint = open_checkpoint(sidecar.addr, "acme", "task-b")
    browser, page = logged_in(plane.console_url, alice)
    form = {"csrf": csrf_of(page), "checkpoint_id": checkpoint, field: value}
    answer = browser.post("/checkpoints/approve", data=form)
    assert answer.status_code == 400
    assert f"{field}: " in answer.text
    assert check(sidecar, "acme", "task-b").decision == pb.DECISION_CHECKPOINT
    bogus = browser.post("/checkpoints/approve", data=form | {field: "0", "checkpoint_id": "not-a-checkpoint"})
    assert bogus.status_code == 400
    assert "checkpoint_id: " in bogus.text
