"""Helpers for the admin API tests: a policy with two tenants, a checkpoint opened by a real check, an admin stub
that sends a bearer token, and an admin tokens file written as an operator would."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grpc

from budgetwarden.transport import new_token, token_digest
from budgetwarden_api.v1 import admin_pb2 as admin_pb
from budgetwarden_api.v1 import admin_pb2_grpc, budget_pb2_grpc
from budgetwarden_api.v1 import budget_pb2 as pb

RPC_TIMEOUT_S = 30
TWO_TENANTS_POLICY = """
unknown_tenants: reject
tenants:
  acme:
    windows:
      day: {tokens: 1000000000}
  globex:
    windows:
      day: {tokens: 1000000000}
models:
  small: {input_usd_per_mtok: 1, output_usd_per_mtok: 4}
default_task_type: gate
task_types:
  gate:
    per_task: {tokens: 100}
    checkpoint_threshold: 1.0
"""


def open_checkpoint(budget_addr: str, tenant: str, task: str, step: str = "s1") -> str:
    """A real check that crosses the task's checkpoint line (gate: 100 tokens); returns the checkpoint id."""
    request = pb.CheckRequest(tenant_id=tenant, task_id=task, step_id=step, estimated_input_tokens=150)
    with grpc.insecure_channel(budget_addr) as channel:
        answer = budget_pb2_grpc.BudgetServiceStub(channel).Check(request, timeout=RPC_TIMEOUT_S)
    assert answer.decision == pb.DECISION_CHECKPOINT, answer
    return str(answer.checkpoint_id)


class Admin:
    """BudgetAdminService over a channel, every call with the given bearer token (None: no credentials)."""

    def __init__(self, channel: grpc.Channel, token: str | None = None) -> None:
        self.stub = admin_pb2_grpc.BudgetAdminServiceStub(channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []

    def call(self, rpc: str, request: Any) -> Any:
        return getattr(self.stub, rpc)(request, timeout=RPC_TIMEOUT_S, metadata=self.metadata)

    def code(self, rpc: str, request: Any) -> grpc.StatusCode:
        """The call's status code (OK when it answered)."""
        try:
            self.call(rpc, request)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[attr-defined, no-any-return]
        return grpc.StatusCode.OK


class TokensFile:
    """An admin tokens file; ``add`` makes a token, writes its hash (replacing the file in one rename, as the kubelet
    updates a mounted Secret) and returns the token."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tokens: list[dict[str, Any]] = []
        self.clients: list[dict[str, Any]] = []
        self.write()

    def write(self) -> None:
        staged = self.path.with_suffix(".new")
        staged.write_text(json.dumps({"tokens": self.tokens, "clients": self.clients}))
        os.replace(staged, self.path)

    def add(self, name: str, role: str, tenants: list[str] | str) -> str:
        token = new_token()
        self.tokens.append({"name": name, "sha256": token_digest(token), "role": role, "tenants": tenants})
        self.write()
        return token

    def add_client(self, name: str, san: str, role: str, tenants: list[str] | str) -> None:
        self.clients.append({"name": name, "san": san, "role": role, "tenants": tenants})
        self.write()


def requests_for(tenant: str) -> dict[str, Any]:
    """One valid request of each admin call, acting on ``tenant``. The checkpoint ids are well formed but not open:
    an allowed decision answers NOT_FOUND (status OK)."""
    from budgetwarden.store import checkpoint_id

    forged = checkpoint_id(tenant, "some-task", 1)
    return {
        "GetTenantWindows": admin_pb.GetTenantWindowsRequest(tenant_id=tenant),
        "ListCheckpoints": admin_pb.ListCheckpointsRequest(tenant_id=tenant),
        "ApproveCheckpoint": admin_pb.ApproveCheckpointRequest(checkpoint_id=forged, add_tokens=10),
        "DenyCheckpoint": admin_pb.DenyCheckpointRequest(checkpoint_id=forged),
        "SetTaskCeiling": admin_pb.SetTaskCeilingRequest(
            tenant_id=tenant, task_id="t-ceiling", mode=admin_pb.CEILING_MODE_SET, ceiling_tokens=500
        ),
        "ResetTask": admin_pb.ResetTaskRequest(tenant_id=tenant, task_id="t-reset"),
    }
