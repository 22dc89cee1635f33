"""Policies that tests of more than one tier share, and the helpers that go with them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import BudgetClient

from support import RunningSidecar, free_port

# A ladder of degrades (a cheaper model, then a shorter context) behind a soft line and a checkpoint: replays.
LADDER_POLICY = """
tenants:
  acme:
    time_zone: UTC
    windows:
      minute: {tokens: 9000}
      day: {tokens: 20000, usd: 900000}
models:
  big: {input_usd_per_mtok: 10, output_usd_per_mtok: 30, degrade_to: small}
  small: {input_usd_per_mtok: 1, output_usd_per_mtok: 4}
default_task_type: agent
task_types:
  agent:
    per_task: {tokens: 5000}
    per_step: {tokens: 2500}
    soft_threshold: 0.5
    checkpoint_threshold: 0.8
    degrade:
      - {name: cheaper, model: cheaper, max_output_tokens: 300}
      - {name: short, max_context_tokens: 400, max_tool_calls: 1}
  plain:
    per_task: {tokens: 3000}
"""

# The policy engine's walk: windows in tokens and USD, counted models, a soft line, a checkpoint and one degrade.
ENGINE_POLICY = """
unknown_tenants: reject
tenants:
  acme:
    windows:
      day: {tokens: 1000000, usd: 100}
models:
  big: {input_usd_per_mtok: 10, cached_input_usd_per_mtok: 2.5, output_usd_per_mtok: 30, degrade_to: small}
  small: {input_usd_per_mtok: 1, cached_input_usd_per_mtok: 0.5, output_usd_per_mtok: 4}
  counted: {encoding: cl100k_base}
  newer: {encoding: o200k_base}
default_task_type: agent
task_types:
  agent:
    per_task: {tokens: 10000}
    per_step: {tokens: 4000}
    soft_threshold: 0.5
    checkpoint_threshold: 0.8
    degrade:
      - {name: cheaper, model: cheaper, max_output_tokens: 500}
  plain:
    per_task: {tokens: 1000000}
"""


def check_acme(client: BudgetClient, step: str, tokens: int, **fields: Any) -> pb.CheckResponse:
    values: dict[str, Any] = {"tenant_id": "acme", "task_id": "t1", "step_id": step, "model": "big"}
    values |= {"estimated_input_tokens": tokens} | fields
    answer = client.check(**values)
    assert not answer.from_fail_mode, answer  # decided by the store, as every test here assumes
    return answer


# An agent's task as the step API and the framework integrations walk it: 10000 tokens, DEGRADE past 5000 (to the
# cheaper model, small, with 200 output tokens and 500 of context), CHECKPOINT past 8000; a plain task type that
# neither degrades nor stops (what does not fit is denied); a tenant whose small minute window denies with a
# retry_after.
AGENT_POLICY = """
unknown_tenants: reject
tenants:
  acme:
    windows:
      day: {tokens: 1000000, usd: 100}
  tight:
    windows:
      minute: {tokens: 1000}
models:
  big: {input_usd_per_mtok: 10, cached_input_usd_per_mtok: 2.5, output_usd_per_mtok: 30, degrade_to: small}
  small: {input_usd_per_mtok: 1, cached_input_usd_per_mtok: 0.5, output_usd_per_mtok: 4}
default_task_type: agent
task_types:
  agent:
    per_task: {tokens: 10000}
    per_step: {tokens: 4000}
    soft_threshold: 0.5
    checkpoint_threshold: 0.8
    degrade:
      - {name: cheaper, model: cheaper, max_output_tokens: 200, max_context_tokens: 500}
  plain:
    per_task: {tokens: 1000000}
    per_step: {tokens: 4000}
"""


def start_with_policy(start_sidecar: Callable[..., RunningSidecar], tmp_path: Path, policy: str) -> RunningSidecar:
    """A sidecar on ``policy`` with its admin service (to approve checkpoints) and a generous check deadline: prompts
    are counted within it (on a busy machine a long one would be estimated)."""
    path = tmp_path / "policy.yaml"
    path.write_text(policy)
    return start_sidecar(policy_file=path, admin_listen=f"127.0.0.1:{free_port()}", check_deadline_ms=60_000)
