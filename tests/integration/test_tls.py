"""Encrypted links (issue 15): the sidecar reaches Redis over TLS with an ACL user, and serves its gRPC listeners over
TLS (mutual TLS optional), with certificates and the Redis password read again when their files change."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from budgetwarden.app import Sidecar
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_api.v1 import budget_pb2_grpc as pb_grpc

from support import RunningSidecar, cli, sidecar_settings
from support_tls import Authority, Pair, TlsRedis

PASSWORD = "first-password"
RPC_TIMEOUT_S = 30


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority(tmp_path / "ca")


@pytest.fixture
def tls_redis(tmp_path: Path, authority: Authority) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path / "redis", authority, PASSWORD)
    yield server
    server.stop()


def check(channel: grpc.Channel, step: str = "s1") -> pb.CheckResponse:
    request = pb.CheckRequest(tenant_id="acme", task_id="t1", step_id=step, estimated_input_tokens=100)
    answer: pb.CheckResponse = pb_grpc.BudgetServiceStub(channel).Check(request, timeout=RPC_TIMEOUT_S)
    return answer


def write_secret(path: Path, text: str) -> None:
    """As the kubelet updates a mounted Secret: the new file appears in one rename."""
    staged = path.with_suffix(".new")
    staged.write_text(text)
    os.replace(staged, path)


# --- Redis over TLS, with an ACL user ---------------------------------------------------------------------------


@pytest.fixture
def tls_redis_sidecar(
    tmp_path: Path, authority: Authority, tls_redis: TlsRedis, start_sidecar: Callable[..., RunningSidecar]
) -> Callable[..., RunningSidecar]:
    client = authority.issue("sidecar", client=True)
    password_file = tmp_path / "redis-password"
    password_file.write_text(PASSWORD + "\n")  # as a Secret written by hand often is: the newline is not the password

    def start(**overrides: object) -> RunningSidecar:
        settings: dict[str, object] = {
            "redis_url": tls_redis.url,
            "redis_tls_ca_file": authority.ca_file,
            "redis_tls_cert_file": client.cert,
            "redis_tls_key_file": client.key,
            "redis_username": TlsRedis.USER,
            "redis_password_file": password_file,
            "store_ping_interval_seconds": 0.05,
        }
        settings.update(overrides)
        return start_sidecar(**settings)

    return start


def test_a_sidecar_keeps_its_budget_in_a_redis_it_reaches_over_tls_as_an_acl_user(
    tls_redis_sidecar: Callable[..., RunningSidecar], tls_redis: TlsRedis
) -> None:
    running = tls_redis_sidecar()
    with grpc.insecure_channel(running.addr) as channel:
        answer = check(channel)
    assert (answer.decision, answer.from_fail_mode) == (pb.DECISION_ALLOW, False)
    with tls_redis.client(PASSWORD) as redis_client:
        assert redis_client.dbsize() > 0  # the reservation lives in that Redis


def test_a_rotated_password_file_is_used_by_the_next_connection(
    tmp_path: Path, tls_redis_sidecar: Callable[..., RunningSidecar], tls_redis: TlsRedis
) -> None:
    running = tls_redis_sidecar()
    with tls_redis.client(PASSWORD) as admin:
        admin.execute_command("ACL", "SETUSER", TlsRedis.USER, "resetpass", ">second-password")
        write_secret(tmp_path / "redis-password", "second-password")
        admin.execute_command("CLIENT", "KILL", "USER", TlsRedis.USER, "SKIPME", "yes")  # every pooled connection
    with grpc.insecure_channel(running.addr) as channel:
        answer = check(channel, "after-rotation")
    assert (answer.decision, answer.from_fail_mode) == (pb.DECISION_ALLOW, False)


def test_a_redis_certificate_another_ca_signed_is_not_trusted(
    tmp_path: Path, tls_redis_sidecar: Callable[..., RunningSidecar]
) -> None:
    stranger = Authority(tmp_path / "stranger-ca", "another CA")
    running = tls_redis_sidecar(redis_tls_ca_file=stranger.ca_file, fail_mode="closed")
    with grpc.insecure_channel(running.addr) as channel:
        answer = check(channel)
        ready = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
    assert (answer.decision, answer.from_fail_mode) == (pb.DECISION_DENY, True)
    assert ready.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_wrong_password_is_refused_by_redis_and_answered_by_the_fail_mode(
    tmp_path: Path, tls_redis_sidecar: Callable[..., RunningSidecar]
) -> None:
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password")
    running = tls_redis_sidecar(redis_password_file=wrong, fail_mode="open")
    with grpc.insecure_channel(running.addr) as channel:
        answer = check(channel)
    assert (answer.decision, answer.from_fail_mode) == (pb.DECISION_ALLOW, True)


# --- the gRPC listeners over TLS -----------------------------------------------------------------------------------


def tls_channel(addr: str, ca_file: Path, client: Pair | None = None) -> grpc.Channel:
    key, cert = (client.key.read_bytes(), client.cert.read_bytes()) if client is not None else (None, None)
    credentials = grpc.ssl_channel_credentials(ca_file.read_bytes(), private_key=key, certificate_chain=cert)
    return grpc.secure_channel(addr, credentials)


def unavailable(call: Callable[[], object]) -> bool:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined, no-any-return]
    return False


@pytest.fixture
def served_pair(tmp_path: Path, authority: Authority) -> Pair:
    issued = authority.issue("sidecar-server")
    pair = Pair(tmp_path / "tls" / "tls.crt", tmp_path / "tls" / "tls.key")  # the names of a kubernetes.io/tls Secret
    pair.cert.parent.mkdir()
    pair.cert.write_bytes(issued.cert.read_bytes())
    pair.key.write_bytes(issued.key.read_bytes())
    return pair


def test_the_budget_and_admin_listeners_serve_tls_and_refuse_plaintext(
    authority: Authority, served_pair: Pair, start_sidecar: Callable[..., RunningSidecar]
) -> None:
    from support import free_port

    admin_addr = f"127.0.0.1:{free_port()}"
    running = start_sidecar(tls_cert_file=served_pair.cert, tls_key_file=served_pair.key, admin_listen=admin_addr)
    with tls_channel(running.addr, authority.ca_file) as channel:
        assert check(channel).decision == pb.DECISION_ALLOW
    with grpc.insecure_channel(running.addr) as plain:
        assert unavailable(lambda: check(plain))
    with grpc.insecure_channel(admin_addr) as plain_admin:
        ping = health_pb2_grpc.HealthStub(plain_admin).Check
        assert unavailable(lambda: ping(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S))


def test_mutual_tls_serves_only_clients_with_a_certificate_the_ca_signed(
    tmp_path: Path, authority: Authority, served_pair: Pair, start_sidecar: Callable[..., RunningSidecar]
) -> None:
    running = start_sidecar(
        tls_cert_file=served_pair.cert, tls_key_file=served_pair.key, tls_client_ca_file=authority.ca_file
    )
    with tls_channel(running.addr, authority.ca_file, authority.issue("agent", client=True)) as channel:
        assert check(channel).decision == pb.DECISION_ALLOW
    with tls_channel(running.addr, authority.ca_file) as anonymous:
        assert unavailable(lambda: check(anonymous))
    stranger = Authority(tmp_path / "stranger-ca", "another CA")
    with tls_channel(running.addr, authority.ca_file, stranger.issue("intruder", client=True)) as intruder:
        assert unavailable(lambda: check(intruder))


def test_a_renewed_certificate_serves_the_next_connection_and_a_broken_renewal_is_not_loaded(
    tmp_path: Path, authority: Authority, served_pair: Pair, start_sidecar: Callable[..., RunningSidecar]
) -> None:
    running = start_sidecar(tls_cert_file=served_pair.cert, tls_key_file=served_pair.key)
    with tls_channel(running.addr, authority.ca_file) as channel:
        assert check(channel, "before").decision == pb.DECISION_ALLOW

    renewed_by = Authority(tmp_path / "next-ca", "the next CA")
    renewal = renewed_by.issue("sidecar-server")
    write_secret(served_pair.cert, renewal.cert.read_text())  # half of a renewal: the old key no longer matches
    with tls_channel(running.addr, authority.ca_file) as channel:
        assert check(channel, "half-renewed").decision == pb.DECISION_ALLOW  # the old pair still serves

    write_secret(served_pair.key, renewal.key.read_text())
    with tls_channel(running.addr, renewed_by.ca_file) as channel:
        assert check(channel, "renewed").decision == pb.DECISION_ALLOW
    with tls_channel(running.addr, authority.ca_file) as stale:
        assert unavailable(lambda: check(stale, "stale"))


def test_a_key_that_does_not_match_its_certificate_stops_the_start_with_one_line(
    redis_url: str, authority: Authority, tmp_path: Path
) -> None:
    other = authority.issue("other")
    mismatched = Pair(authority.issue("sidecar-server").cert, other.key)
    settings = sidecar_settings(redis_url, tls_cert_file=mismatched.cert, tls_key_file=mismatched.key)
    with pytest.raises(OSError, match="tls_cert_file / tls_key_file / tls_client_ca_file do not load"):
        asyncio.run(Sidecar(settings).start())


def test_the_usage_commands_reach_a_tls_redis_with_the_sidecars_settings(
    tmp_path: Path,
    authority: Authority,
    tls_redis: TlsRedis,
    tls_redis_sidecar: Callable[..., RunningSidecar],
) -> None:
    running = tls_redis_sidecar()
    with grpc.insecure_channel(running.addr) as channel:
        assert check(channel).decision == pb.DECISION_ALLOW
    client = authority.issue("usage-reader", client=True)
    password_file = tmp_path / "reader-password"
    password_file.write_text(PASSWORD)
    env = {
        "BUDGETWARDEN_REDIS_TLS_CA_FILE": str(authority.ca_file),
        "BUDGETWARDEN_REDIS_TLS_CERT_FILE": str(client.cert),
        "BUDGETWARDEN_REDIS_TLS_KEY_FILE": str(client.key),
        "BUDGETWARDEN_REDIS_USERNAME": TlsRedis.USER,
        "BUDGETWARDEN_REDIS_PASSWORD_FILE": str(password_file),
    }
    result = cli("usage", "summary", "--tenant", "acme", "--since", "1d", "--redis-url", tls_redis.url, env=env)
    assert result.returncode == 0, result.stderr
