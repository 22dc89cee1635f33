"""The Python client over TLS (issue 15) and with admin credentials (issue 14): ``ClientTls`` in code or from
``BUDGETWARDEN_CLIENT_TLS_*``, for the budget client, the asyncio client, the background reporter and the admin
client; the admin client's bearer token in code or from ``BUDGETWARDEN_ADMIN_TOKEN``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from budgetwarden_client import AdminClient, AsyncBudgetClient, BackgroundReporter, BudgetClient, ClientTls, pb

from support import RunningSidecar, free_port
from support_admin import TWO_TENANTS_POLICY, TokensFile
from support_tls import Authority, Pair

RPC_TIMEOUT_S = 30.0


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority(tmp_path / "ca")


@pytest.fixture
def tokens(tmp_path: Path) -> TokensFile:
    return TokensFile(tmp_path / "admin-tokens.json")


@pytest.fixture
def tls_sidecar(
    tmp_path: Path, authority: Authority, tokens: TokensFile, start_sidecar: Callable[..., RunningSidecar]
) -> RunningSidecar:
    served: Pair = authority.issue("sidecar-server")
    policy = tmp_path / "policy.yaml"
    policy.write_text(TWO_TENANTS_POLICY)
    return start_sidecar(
        policy_file=policy,
        tls_cert_file=served.cert,
        tls_key_file=served.key,
        admin_listen=f"127.0.0.1:{free_port()}",
        admin_tokens_file=tokens.path,
    )


def task_used(client: BudgetClient, task: str) -> int:
    answer = client.get_budget(tenant_id="acme", task_id=task)
    return next(int(scope.used_tokens) for scope in answer.scopes if scope.name == "task")


def test_the_budget_client_speaks_tls_given_in_code(authority: Authority, tls_sidecar: RunningSidecar) -> None:
    with BudgetClient(tls_sidecar.addr, timeout=RPC_TIMEOUT_S, tls=ClientTls(ca_file=authority.ca_file)) as client:
        answer = client.check(tenant_id="acme", task_id="t1", step_id="s1", estimated_input_tokens=10)
    assert answer.decision == pb.DECISION_ALLOW
    plaintext = BudgetClient(tls_sidecar.addr, timeout=RPC_TIMEOUT_S)  # the same call without TLS fails
    with plaintext, pytest.raises(grpc.RpcError) as refused:
        plaintext.check(tenant_id="acme", task_id="t1", step_id="s2", estimated_input_tokens=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_every_client_takes_tls_from_the_environment(
    authority: Authority, tls_sidecar: RunningSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUDGETWARDEN_CLIENT_TLS_CA_FILE", str(authority.ca_file))

    async def async_check() -> pb.CheckResponse:
        async with AsyncBudgetClient(tls_sidecar.addr, timeout=RPC_TIMEOUT_S) as client:
            return await client.check(tenant_id="acme", task_id="t2", step_id="s1", estimated_input_tokens=10)

    assert asyncio.run(async_check()).decision == pb.DECISION_ALLOW
    reporter = BackgroundReporter(tls_sidecar.addr, flush_interval=0.01)
    reporter.report(pb.UsageRecord(tenant_id="acme", task_id="t2", step_id="s1", input_tokens=7))
    reporter.close(timeout=RPC_TIMEOUT_S)
    assert reporter.stats.lost == 0, "the reporter did not deliver over TLS"
    with BudgetClient(tls_sidecar.addr, timeout=RPC_TIMEOUT_S) as client:
        assert task_used(client, "t2") == 7


def test_the_admin_client_lists_checkpoints_with_its_token_over_tls(
    authority: Authority, tokens: TokensFile, tls_sidecar: RunningSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = ClientTls(ca_file=authority.ca_file)
    with BudgetClient(tls_sidecar.addr, timeout=RPC_TIMEOUT_S, tls=tls) as client:
        opened = client.check(tenant_id="acme", task_id="t3", step_id="s1", estimated_input_tokens=150)
    assert opened.decision == pb.DECISION_CHECKPOINT
    admin_addr = tls_sidecar.settings.admin_listen
    token = tokens.add("alice", "approver", ["acme"])

    with AdminClient(admin_addr, timeout=RPC_TIMEOUT_S, token=token, tls=tls) as admin:
        listed = admin.list_checkpoints("acme")
    assert [checkpoint.checkpoint_id for checkpoint in listed.checkpoints] == [opened.checkpoint_id]

    anonymous = AdminClient(admin_addr, timeout=RPC_TIMEOUT_S, tls=tls)
    with anonymous, pytest.raises(grpc.RpcError) as refused:
        anonymous.list_checkpoints("acme")
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    monkeypatch.setenv("BUDGETWARDEN_ADMIN_TOKEN", token)
    with AdminClient(admin_addr, timeout=RPC_TIMEOUT_S, tls=tls) as from_env:
        assert from_env.deny(opened.checkpoint_id).outcome  # answered, with the token from the environment
