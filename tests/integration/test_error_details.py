"""Rich errors and reflection, read by real gRPC clients over a socket.

INVALID_ARGUMENT carries a google.rpc.BadRequest (field path and description) beside its message; an UNAVAILABLE the
sidecar answers itself (its store is down) carries a google.rpc.ErrorInfo; reflection answers as grpc.reflection.v1
as well as v1alpha, on the main and the admin listener.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status

from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import AdminClient, BudgetClient, CheckRefusedError, admin_pb

from support import RunningSidecar, free_port


@pytest.fixture
def running(start_sidecar: Callable[..., RunningSidecar]) -> RunningSidecar:
    return start_sidecar(admin_listen=f"127.0.0.1:{free_port()}")


@pytest.fixture
def client(running: RunningSidecar) -> Iterator[BudgetClient]:
    with BudgetClient(running.addr, timeout=30) as c:
        yield c


def violations(call: Callable[[], Any]) -> list[tuple[str, str]]:
    """The BadRequest field violations of the INVALID_ARGUMENT that ``call`` raises, as (field, description)."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == error.details()
    (detail,) = status.details
    bad_request = error_details_pb2.BadRequest()
    assert detail.Unpack(bad_request), detail.type_url
    return [(v.field, v.description) for v in bad_request.field_violations]


def test_check_names_the_field_in_a_bad_request_detail(client: BudgetClient) -> None:
    assert violations(lambda: client.check(tenant_id="", task_id="t1", step_id="s1")) == [("tenant_id", "is required")]
    assert violations(
        lambda: client.check(tenant_id="acme", task_id="t1", step_id="s1", estimated_input_tokens=-3)
    ) == [("estimated_input_tokens", "must not be negative (got -3)")]
    ((field, description),) = violations(
        lambda: client.check(tenant_id="acme", task_id="t1", step_id="s1", labels={"team": "x" * 300})
    )
    assert (field, description) == ("labels['team']", "value is longer than 256 bytes")


def test_report_release_and_budget_name_the_field(client: BudgetClient) -> None:
    good = pb.UsageRecord(tenant_id="acme", task_id="t1", step_id="s1", input_tokens=5)
    bad = pb.UsageRecord(tenant_id="acme", task_id="t1", step_id="s2", input_tokens=5, cached_input_tokens=9)

    assert violations(lambda: client.report([good, bad])) == [
        ("records[1].cached_input_tokens", "(9) must not exceed input_tokens (5)")
    ]
    assert violations(lambda: client.release(tenant_id="acme", reservation_id="XYZ"))[0][0] == "reservation_id"
    assert violations(lambda: client.get_budget(tenant_id="")) == [("tenant_id", "is required")]


def test_report_stream_names_the_field_within_its_message(client: BudgetClient) -> None:
    good = pb.UsageRecord(tenant_id="acme", task_id="t1", step_id="s1", input_tokens=5)
    bad = pb.UsageRecord(tenant_id="acme", task_id="t1", step_id="s2", output_tokens=-1)
    messages = [pb.ReportStreamRequest(records=[good]), pb.ReportStreamRequest(records=[bad])]

    def send() -> Any:
        return client._stub.ReportStream(iter(messages), timeout=30)

    with pytest.raises(grpc.RpcError) as caught:
        send()
    assert caught.value.details() == "message 1: records[0].output_tokens: must not be negative (got -1)"
    assert violations(send) == [("records[0].output_tokens", "must not be negative (got -1)")]


def test_bytes_that_do_not_parse_carry_a_violation_of_the_whole_request(running: RunningSidecar) -> None:
    with grpc.insecure_channel(running.addr) as channel:
        call = channel.unary_unary("/budgetwarden.v1.BudgetService/Check")
        ((field, description),) = violations(lambda: call(b"\x0a\x02\xff\xfe", timeout=30))
    assert field == ""
    assert description.startswith("not a valid CheckRequest ("), description


def test_check_stream_message_limit_is_a_violation_of_checks(client: BudgetClient) -> None:
    too_many = pb.CheckStreamRequest(checks=[pb.CheckRequest(tenant_id="acme", task_id="t", step_id="s")] * 1001)

    def send() -> Any:
        return list(client._stub.CheckStream(iter([too_many]), timeout=30))

    assert violations(send) == [("checks", "holds 1001, at most 1000 are allowed")]


def test_check_stream_per_check_errors_keep_their_message(client: BudgetClient) -> None:
    (answer,) = client.check_many([{"tenant_id": "acme", "task_id": "", "step_id": "s1"}])

    assert isinstance(answer, CheckRefusedError)
    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert answer.details() == "checks[0].task_id: is required"


def test_admin_requests_name_the_field(running: RunningSidecar) -> None:
    assert running.settings.admin_listen
    with AdminClient(running.settings.admin_listen, timeout=30) as admin:
        assert violations(lambda: admin.approve("ck1.nothing-like-an-id", add_tokens=5)) == [
            ("checkpoint_id", "is not a checkpoint id issued by budgetwarden (ck1.…)")
        ]
        assert violations(lambda: admin.approve("", add_tokens=5)) == [("checkpoint_id", "is required")]
        no_ceiling = {"tenant_id": "acme", "task_id": "t1", "mode": admin_pb.CEILING_MODE_SET}
        assert violations(lambda: admin.set_ceiling(**no_ceiling)) == [
            ("ceiling_tokens", "or ceiling_usd_micros is required")
        ]
        assert violations(lambda: admin.reset_task("acme", "")) == [("task_id", "is required")]


def test_an_unavailable_store_is_told_apart_from_an_unreachable_sidecar(
    start_sidecar: Callable[..., RunningSidecar],
) -> None:
    # Nothing listens on the store's port: the sidecar answers, its store does not.
    running = start_sidecar(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    record = pb.UsageRecord(tenant_id="acme", task_id="t1", step_id="s1", input_tokens=5)
    with BudgetClient(running.addr, timeout=30) as client, pytest.raises(grpc.RpcError) as caught:
        client.report([record])

    error = caught.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details().startswith("budget store unavailable: ")
    # The hint says what is true: each store call applies up to 100 records of one tenant, all or none.
    assert "may have been applied in part or in whole" in error.details()
    assert "send the same records again unchanged, applied ones answer DUPLICATE" in error.details()
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert (info.reason, info.domain) == ("STORE_UNAVAILABLE", "budgetwarden.io")


# --- reflection -------------------------------------------------------------------------------------------------

# grpc/reflection/v1/reflection.proto's messages as a v1 client knows them (the parts this test uses), written out here
# rather than taken from the server or from v1alpha, so the test holds the server to the v1 wire format.
REFLECTION_V1_CLIENT = """
name: "test/reflection_v1_client.proto"
package: "grpc.reflection.v1"
syntax: "proto3"
message_type {
  name: "ServerReflectionRequest"
  field { name: "host" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }
  field { name: "file_containing_symbol" number: 4 type: TYPE_STRING label: LABEL_OPTIONAL oneof_index: 0 }
  field { name: "list_services" number: 7 type: TYPE_STRING label: LABEL_OPTIONAL oneof_index: 0 }
  oneof_decl { name: "message_request" }
}
message_type {
  name: "ServerReflectionResponse"
  field { name: "valid_host" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }
  field { name: "file_descriptor_response" number: 4 type: TYPE_MESSAGE label: LABEL_OPTIONAL oneof_index: 0
          type_name: ".grpc.reflection.v1.FileDescriptorResponse" }
  field { name: "list_services_response" number: 6 type: TYPE_MESSAGE label: LABEL_OPTIONAL oneof_index: 0
          type_name: ".grpc.reflection.v1.ListServiceResponse" }
  field { name: "error_response" number: 7 type: TYPE_MESSAGE label: LABEL_OPTIONAL oneof_index: 0
          type_name: ".grpc.reflection.v1.ErrorResponse" }
  oneof_decl { name: "message_response" }
}
message_type {
  name: "FileDescriptorResponse"
  field { name: "file_descriptor_proto" number: 1 type: TYPE_BYTES label: LABEL_REPEATED }
}
message_type {
  name: "ListServiceResponse"
  field { name: "service" number: 1 type: TYPE_MESSAGE label: LABEL_REPEATED
          type_name: ".grpc.reflection.v1.ServiceResponse" }
}
message_type {
  name: "ServiceResponse"
  field { name: "name" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }
}
message_type {
  name: "ErrorResponse"
  field { name: "error_code" number: 1 type: TYPE_INT32 label: LABEL_OPTIONAL }
  field { name: "error_message" number: 2 type: TYPE_STRING label: LABEL_OPTIONAL }
}
"""


def v1_client_messages() -> tuple[Any, Any]:
    pool = descriptor_pool.DescriptorPool()  # its own pool: nothing shared with the server's descriptors
    pool.Add(text_format.Parse(REFLECTION_V1_CLIENT, descriptor_pb2.FileDescriptorProto()))
    request = message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest"))
    response = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
    )
    return request, response


def reflect(addr: str, path: str, requests: list[Any], response_type: Any) -> list[Any]:
    with grpc.insecure_channel(addr) as channel:
        call = channel.stream_stream(
            path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=response_type.FromString
        )
        return list(call(iter(requests), timeout=30))


def test_reflection_v1_lists_and_describes_the_services_on_both_listeners(running: RunningSidecar) -> None:
    request, response = v1_client_messages()
    v1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
    assert running.settings.admin_listen
    listeners = {
        running.addr: "budgetwarden.v1.BudgetService",
        running.settings.admin_listen: "budgetwarden.v1.BudgetAdminService",
    }
    for addr, service in listeners.items():
        listed, described, itself = reflect(
            addr,
            v1,
            [
                request(list_services=""),
                request(file_containing_symbol=service),
                request(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
            ],
            response,
        )
        names = {s.name for s in listed.list_services_response.service}
        assert {service, "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names
        assert not described.HasField("error_response"), described.error_response
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in described.file_descriptor_response.file_descriptor_proto
        ]
        assert any(service.rsplit(".", 1)[1] in [s.name for s in f.service] for f in files)
        own = descriptor_pb2.FileDescriptorProto.FromString(itself.file_descriptor_response.file_descriptor_proto[0])
        assert own.package == "grpc.reflection.v1"
        assert [s.name for s in own.service] == ["ServerReflection"]


def test_reflection_v1alpha_still_lists_the_services(running: RunningSidecar) -> None:
    (listed,) = reflect(
        running.addr,
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        [reflection_pb2.ServerReflectionRequest(list_services="")],
        reflection_pb2.ServerReflectionResponse,
    )
    names = {s.name for s in listed.list_services_response.service}
    assert {"budgetwarden.v1.BudgetService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= names
