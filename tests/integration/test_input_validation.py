"""Ids and labels refuse control, format and separator characters (Unicode Cc, Cf, Zl, Zp) in every request type.

A bidi override (U+202E) in a task id shows another name in logs and dashboards; a line separator splits a log line.
Every id and label field of every request is tried over a real socket with each kind of character: the answer is
INVALID_ARGUMENT naming the field (for a CheckStream check: that check's error), and nothing reaches Redis.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import redis

from budgetwarden.transport._validation import InvalidRequestError, ident
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import AdminClient, BudgetClient, CheckRefusedError, admin_pb

from support import TEST_RPC_TIMEOUT_S, RunningSidecar, free_port

# One character of each refused kind, and the ones the issue found accepted (DEL, a C1 control, U+2028, U+202E).
REFUSED = {
    "NUL": "\x00",
    "LF": "\n",
    "DEL": "\x7f",
    "C1 NEL": "\x85",
    "C1 CSI": "\x9b",
    "LINE SEPARATOR": "\u2028",
    "PARAGRAPH SEPARATOR": "\u2029",
    "RIGHT-TO-LEFT OVERRIDE": "\u202e",
    "ZERO WIDTH SPACE": "\u200b",
    "BYTE ORDER MARK": "\ufeff",
    "LANGUAGE TAG": "\U000e0001",
}
# Text people really name things with, printable or not (a no-break space is Zs, not refused).
ACCEPTED = ["café", "日本語", "agent 🙂", "no\u00a0break", "ש", "tab-free id.with:punctuation/and=signs"]


def spoof(char: str) -> str:
    return f"task{char}gpj.exe"


@pytest.fixture
def running(start_sidecar: Callable[..., RunningSidecar]) -> RunningSidecar:
    return start_sidecar(admin_listen=f"127.0.0.1:{free_port()}")


@pytest.fixture
def client(running: RunningSidecar) -> Iterator[BudgetClient]:
    with BudgetClient(running.addr, timeout=30) as c:
        yield c


@pytest.fixture
def admin(running: RunningSidecar) -> Iterator[AdminClient]:
    assert running.settings.admin_listen
    with AdminClient(running.settings.admin_listen, timeout=30) as c:
        yield c


def refused(call: Callable[[], Any]) -> str:
    """The details of the INVALID_ARGUMENT ``call`` must raise."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (caught.value.code(), caught.value.details())
    return str(caught.value.details())


def assert_each_refused(fields: dict[str, Callable[[str], Callable[[], Any]]], expected: Callable[[str], str]) -> None:
    """Every field with every refused character is INVALID_ARGUMENT whose details start with ``expected(field)``."""
    failures = []
    for field, make_call in fields.items():
        for kind, char in REFUSED.items():
            details = refused(make_call(spoof(char)))
            if not details.startswith(f"{expected(field)}: ") or f"U+{ord(char):04X}" not in details:
                failures.append(f"{field} with {kind}: {details!r}")
    assert not failures, "\n".join(failures)


CHECK = {"tenant_id": "acme", "task_id": "t1", "step_id": "s1", "estimated_input_tokens": 10}
RECORD = {"tenant_id": "acme", "task_id": "t1", "step_id": "s1", "input_tokens": 10}


def check_fields(send: Callable[[dict[str, Any]], Any]) -> dict[str, Callable[[str], Callable[[], Any]]]:
    """Each id and label field of a CheckRequest, as a call that sends a check with a given value there."""

    def with_field(name: str) -> Callable[[str], Callable[[], Any]]:
        return lambda value: lambda: send({**CHECK, name: value})

    fields = {name: with_field(name) for name in ("tenant_id", "task_id", "step_id", "task_type", "model")}
    fields["labels['team']"] = lambda value: lambda: send({**CHECK, "labels": {"team": value}})
    fields["labels[key]"] = lambda value: lambda: send({**CHECK, "labels": {value: "v"}})
    for part in ("role", "name"):
        fields[f"prompt_messages.messages[0].{part}"] = lambda value, part=part: (
            lambda: send(  # type: ignore[misc]
                {
                    **{k: v for k, v in CHECK.items() if k != "estimated_input_tokens"},
                    "prompt_messages": pb.ChatPrompt(
                        messages=[pb.ChatMessage(**{"role": "user", "content": "hi", part: value})]
                    ),
                }
            )
        )
    return fields


def test_check_refuses_every_kind_in_every_id_and_label(client: BudgetClient, sync_redis: redis.Redis) -> None:
    fields = check_fields(lambda values: client.check(**values))
    key_field = fields.pop("labels[key]")

    assert_each_refused(fields, lambda field: field)
    for char in REFUSED.values():
        details = refused(key_field(spoof(char)))
        # The key is quoted as Python's repr, which escapes the character, so the log line shows what it is.
        assert details.startswith(f"labels[{spoof(char)!r}]: key contains "), details
        assert char not in details
    assert sync_redis.dbsize() == 0


def test_check_stream_refuses_each_bad_check_and_decides_the_others(
    client: BudgetClient, sync_redis: redis.Redis
) -> None:
    def send(values: dict[str, Any]) -> pb.CheckResponse:
        good = {**CHECK, "step_id": "fine"}
        bad, fine = client.check_many([values, good])
        assert isinstance(fine, pb.CheckResponse), fine
        assert fine.decision == pb.DECISION_ALLOW, fine
        if isinstance(bad, CheckRefusedError):
            raise bad
        return bad

    fields = check_fields(send)
    fields.pop("labels[key]")

    assert_each_refused(fields, lambda field: f"checks[0].{field}")
    # Only the good check of each message reserved anything: its step, once.
    with BudgetClient(client.addr, timeout=TEST_RPC_TIMEOUT_S) as other:
        task = next(s for s in other.get_budget(tenant_id="acme", task_id="t1").scopes if s.name == "task")
    assert task.reserved_tokens == 10


def record_fields(send: Callable[[pb.UsageRecord], Any]) -> dict[str, Callable[[str], Callable[[], Any]]]:
    def with_field(name: str) -> Callable[[str], Callable[[], Any]]:
        return lambda value: lambda: send(pb.UsageRecord(**{**RECORD, name: value}))

    names = ("tenant_id", "task_id", "step_id", "task_type", "model", "idempotency_key")
    fields = {name: with_field(name) for name in names}
    fields["labels['team']"] = lambda value: lambda: send(pb.UsageRecord(**RECORD, labels={"team": value}))
    return fields


def test_report_refuses_every_kind_in_every_id_and_label(client: BudgetClient, sync_redis: redis.Redis) -> None:
    fine = pb.UsageRecord(**{**RECORD, "step_id": "fine"})
    fields = record_fields(lambda record: client.report([fine, record]))

    assert_each_refused(fields, lambda field: f"records[1].{field}")
    assert sync_redis.dbsize() == 0  # the good record beside the bad one was not applied either


def test_report_stream_refuses_every_kind_in_every_id_and_label(client: BudgetClient, sync_redis: redis.Redis) -> None:
    def send(record: pb.UsageRecord) -> Any:
        return client._stub.ReportStream(iter([pb.ReportStreamRequest(records=[record])]), timeout=30)

    assert_each_refused(record_fields(send), lambda field: f"message 0: records[0].{field}")
    assert sync_redis.dbsize() == 0


def test_release_and_get_budget_refuse_every_kind(client: BudgetClient, sync_redis: redis.Redis) -> None:
    release = {"tenant_id": "acme", "task_id": "t1", "step_id": "s1"}
    budget = {"tenant_id": "acme", "task_id": "t1", "task_type": ""}

    def call(method: Callable[..., Any], base: dict[str, str], name: str) -> Callable[[str], Callable[[], Any]]:
        return lambda value: lambda: method(**{**base, name: value})

    assert_each_refused({name: call(client.release, release, name) for name in release}, lambda field: field)
    assert_each_refused({name: call(client.get_budget, budget, name) for name in budget}, lambda field: field)
    assert sync_redis.dbsize() == 0


def test_admin_requests_refuse_every_kind(admin: AdminClient, sync_redis: redis.Redis) -> None:
    ids = {"tenant_id": "acme", "task_id": "t1"}
    fields: dict[str, Callable[[str], Callable[[], Any]]] = {
        "ApproveCheckpoint checkpoint_id": lambda value: lambda: admin.approve(value, add_tokens=5),
        "DenyCheckpoint checkpoint_id": lambda value: lambda: admin.deny(value),
        "GetTenantWindows tenant_id": lambda value: lambda: admin.tenant_windows(value),
    }
    for name in ids:
        fields[f"SetTaskCeiling {name}"] = lambda value, name=name: (
            lambda: admin.set_ceiling(  # type: ignore[misc]
                **{**ids, name: value}, mode=admin_pb.CEILING_MODE_SET, ceiling_tokens=100
            )
        )
        fields[f"ResetTask {name}"] = lambda value, name=name: (
            lambda: admin.reset_task(  # type: ignore[misc]
                **{**ids, name: value}
            )
        )

    assert_each_refused(fields, lambda field: field.split()[1])
    assert sync_redis.dbsize() == 0


def test_printable_text_in_every_script_is_accepted(client: BudgetClient) -> None:
    for i, text in enumerate(ACCEPTED):
        answer = client.check(
            tenant_id=text, task_id=text, step_id=f"s{i}", task_type="", model="", estimated_input_tokens=5,
            labels={text: text},
        )  # fmt: skip
        assert answer.decision == pb.DECISION_ALLOW, (text, answer)
        record = pb.UsageRecord(tenant_id=text, task_id=text, step_id=f"s{i}", input_tokens=5, idempotency_key=text)
        assert client.report([record]).results[0].status == pb.REPORT_STATUS_APPLIED


@pytest.mark.parametrize("char", sorted(REFUSED.values()), ids=lambda c: f"U+{ord(c):04X}")
def test_ident_names_the_character_its_kind_and_position(char: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        ident(f"ab{char}c", "task_id")

    assert caught.value.field == "task_id"
    assert f"(U+{ord(char):04X} at position 2)" in caught.value.problem
    assert "Cc, Cf, Zl, Zp" in caught.value.problem


def test_ident_refuses_every_character_of_the_refused_categories_in_the_basic_plane() -> None:
    # Only what unicodedata calls Cc, Cf, Zl or Zp is refused; every other character (Zs, Co, Cn, letters) is not.
    for code in range(0x10000):
        char = chr(code)
        if 0xD800 <= code <= 0xDFFF:
            continue  # surrogates cannot travel in a protobuf string
        refused_here = unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")
        try:
            ident(f"x{char}", "task_id")
        except InvalidRequestError:
            assert refused_here, f"U+{code:04X} ({unicodedata.category(char)}) was refused"
        else:
            assert not refused_here, f"U+{code:04X} ({unicodedata.category(char)}) was accepted"
