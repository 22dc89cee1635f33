"""The ``budgetwarden`` command: run the sidecar, talk to it, validate policies.

Errors are one line on stderr and a non-zero exit; never a traceback.
Exit codes: 0 success (for ``check``: allowed or degraded), 1 error (server unreachable, rejected request, bad file),
2 bad arguments, 3 ``check`` answered deny or checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import sys
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf.json_format import MessageToDict
from google.rpc.error_details_pb2 import ErrorInfo
from grpc_status import rpc_status
from pydantic import ValidationError

from budgetwarden import __version__
from budgetwarden.app import ConfigFileError, Settings, load_settings
from budgetwarden.domain import (
    MAX_LIMIT_TOKENS,
    MAX_LIMIT_USD,
    MAX_TOKENS_PER_FIELD,
    PolicyError,
    default_policy,
    explain,
    load_policy,
    micros_to_usd,
    usd_text,
    usd_to_micros,
)
from budgetwarden.inject import add_arguments as add_inject_arguments
from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client import DEFAULT_ADMIN_ADDR, BudgetClient, admin_pb, default_addr
from budgetwarden_client._channels import ClientTls, bearer_metadata, open_channel

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DENIED = 0, 1, 2, 3


class CliError(Exception):
    pass


class UsageError(CliError):
    """Arguments that cannot make a request (exit 2, like argparse's own errors)."""


TENANT_ENV = "BUDGETWARDEN_TENANT"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://")
MAX_LEASE_SECONDS = 2**32 - 1  # the wire's bound (uint32); the sidecar refuses more than its --max-lease-seconds
MAX_TIMEOUT_SECONDS = 86_400.0
MAX_TOOL_CALLS = 100_000  # _validation.MAX_TOOL_CALLS: importing that module would load redis into every command


def _integer(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high``. Out of range (or too large for the wire), argparse prints
    one line naming the flag instead of a traceback from the protobuf encoder."""

    def parse(text: str) -> int:
        value = int(text)  # a ValueError is argparse's "invalid int value"
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high} (got {text})")
        return value

    parse.__name__ = "int"
    return parse


def _number(low: float, high: float, *, above_low: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number from ``low`` (or above it) to ``high``."""

    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or value > high or value < low or (above_low and value == low):
            bound = f"above {low:g} and at most {high:g}" if above_low else f"from {low:g} to {high:g}"
            raise argparse.ArgumentTypeError(f"must be a number {bound} (got {text})")
        return value

    parse.__name__ = "number"
    return parse


TOKENS = _integer(0, MAX_TOKENS_PER_FIELD)
TOOL_CALLS = _integer(0, MAX_TOOL_CALLS)
LIMIT_TOKENS = _integer(0, MAX_LIMIT_TOKENS)
LIMIT_USD = _number(0.0, micros_to_usd(MAX_LIMIT_USD))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, so flags, environment variables and the config file can never drift apart."""
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "BUDGETWARDEN_" + name.upper()
        # argparse formats help with %: a literal one in a description must be doubled.
        help_text = f"{info.description} [env {env}; default {info.default}]".replace("%", "%%")
        if info.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        choices = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is typing.Literal else None
        parser.add_argument(flag, dest=name, default=None, choices=choices, help=help_text)


def _timeout_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=_number(0.0, MAX_TIMEOUT_SECONDS, above_low=True),
        default=5.0,
        help="seconds to wait for the answer (default 5)",
    )


def _tenant_flag(parser: argparse.ArgumentParser, help_text: str = "tenant id") -> None:
    """--tenant, else BUDGETWARDEN_TENANT, else an error: a tenant picked silently would charge someone else."""
    parser.add_argument(
        "--tenant", default=os.environ.get(TENANT_ENV) or None, help=f"{help_text} [env {TENANT_ENV}; required]"
    )


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--addr", default=None, help="sidecar address [env BUDGETWARDEN_ADDR; default 127.0.0.1:50151]")
    _timeout_flag(parser)
    parser.add_argument("--json", action="store_true", help="print the response as JSON")
    _tenant_flag(parser)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="budgetwarden", description="Token-budget sidecar for AI agents.")
    parser.add_argument("--version", action="version", version=f"budgetwarden {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the sidecar (starts the embedded Redis unless --redis-url is set)")
    serve.add_argument("--config", type=Path, default=None, help="YAML file of settings (lowest precedence)")
    _add_setting_flags(serve)

    check = commands.add_parser("check", help="ask whether a step may run, and reserve its tokens")
    _client_flags(check)
    check.add_argument("--task", required=True, help="task id")
    check.add_argument("--step", required=True, help="step id")
    check.add_argument("--tokens", type=TOKENS, default=None, help="tokens asked for in all (counted as input)")
    check.add_argument("--input-tokens", type=TOKENS, default=0, help="estimated input tokens")
    check.add_argument("--output-tokens", type=TOKENS, default=0, help="max output tokens")
    check.add_argument("--tool-calls", type=TOOL_CALLS, default=0, help="planned tool calls")
    check.add_argument("--task-type", default="", help="task type (default: the policy's)")
    check.add_argument("--model", default="", help="model the step will call")
    check.add_argument("--lease", type=_integer(1, MAX_LEASE_SECONDS), default=None, help="lease in seconds")
    check.add_argument(
        "--ceiling", type=_integer(1, MAX_LIMIT_TOKENS), default=None, help="explicit task ceiling (first check only)"
    )
    check.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="attribution label")

    report = commands.add_parser("report", help="report what a step really spent")
    _client_flags(report)
    report.add_argument("--reservation", default="", help="reservation id (or --task and --step)")
    report.add_argument("--task", default="", help="task id")
    report.add_argument("--step", default="", help="step id")
    # No defaults: a report must say what the step spent (a report of nothing would take the step's one report).
    report.add_argument("--input-tokens", type=TOKENS, default=None, help="input tokens, cached ones included")
    report.add_argument("--output-tokens", type=TOKENS, default=None, help="output tokens")
    report.add_argument("--cached-input-tokens", type=TOKENS, default=None, help="input tokens served from a cache")
    report.add_argument("--tool-calls", type=TOOL_CALLS, default=None, help="tool calls made")
    report.add_argument("--model", default="")
    report.add_argument("--task-type", default="")
    report.add_argument("--outcome", choices=["completed", "failed", "cancelled"], default="completed")
    report.add_argument("--idempotency-key", default="", help="default: one report per step")

    release = commands.add_parser("release", help="hand back a reservation whose step will not run")
    _client_flags(release)
    release.add_argument("--reservation", default="", help="reservation id (or --task and --step)")
    release.add_argument("--task", default="")
    release.add_argument("--step", default="")

    budget = commands.add_parser("budget", help="show a task's budget and its tenant's windows")
    _client_flags(budget)
    budget.add_argument("--task", default="", help="task id (default: only the tenant's windows)")
    budget.add_argument("--task-type", default="")

    approve = commands.add_parser("approve", help="approve a checkpoint: raise the task's ceiling and let it go on")
    approve.add_argument("checkpoint", help="checkpoint id (from check or budget)")
    approve.add_argument("--add", type=LIMIT_TOKENS, default=0, help="tokens to add to the task's ceiling")
    approve.add_argument("--add-usd", type=LIMIT_USD, default=0.0, help="USD to add to the task's cost ceiling")
    _admin_flags(approve)

    deny = commands.add_parser("deny", help="deny a checkpoint: close the task")
    deny.add_argument("checkpoint", help="checkpoint id")
    _admin_flags(deny)

    checkpoints = commands.add_parser("checkpoints", help="list a tenant's checkpoints (admin API)")
    checkpoint_commands = checkpoints.add_subparsers(dest="checkpoints_command", required=True, parser_class=_Parser)
    listing = checkpoint_commands.add_parser("list", help="open checkpoints (oldest first), or decided ones")
    _tenant_flag(listing)
    listing.add_argument("--decided", action="store_true", help="the approved and denied ones, latest first")
    listing.add_argument("--page-size", type=_integer(1, 500), default=50, help="checkpoints per page (default 50)")
    listing.add_argument("--page-token", default="", help="next_page_token of a previous page")
    listing.add_argument("--all", action="store_true", help="follow next_page_token to the last page")
    _admin_flags(listing)

    admin_token = commands.add_parser("admin-token", help="make credentials for the admin API")
    token_commands = admin_token.add_subparsers(dest="admin_token_command", required=True, parser_class=_Parser)
    token_new = token_commands.add_parser(
        "new", help="print a new bearer token (once) and its entry for the admin tokens file"
    )
    token_new.add_argument("--name", required=True, help="who holds it (recorded in the audit trail)")
    token_new.add_argument("--role", required=True, choices=["viewer", "approver", "admin"])
    token_new.add_argument(
        "--tenant", action="append", required=True, help="a tenant it may act on (repeat for more; '*' for all)"
    )

    audit = commands.add_parser("audit", help="read the audit trail of admin calls from Redis")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, parser_class=_Parser)
    audit_export = audit_commands.add_parser("export", help="write audit entries as JSON lines, oldest first")
    audit_export.add_argument("--since", required=True, help="ISO 8601 time, epoch milliseconds, or an age like 24h")
    audit_export.add_argument("--until", default=None, help="same forms as --since (default: now)")
    audit_export.add_argument(
        "--tenant", default=None, help="one tenant (default: every tenant, and refusals naming none)"
    )
    audit_export.add_argument("--output", type=Path, default=None, help="file to write (default: standard output)")
    _redis_flags(audit_export)

    control = commands.add_parser(
        "control-plane",
        help="serve the admin API (approvals, ceilings, checkpoints) against the sidecars' Redis",
        description="Serves BudgetAdminService, health and reflection on --admin-listen (default 127.0.0.1:50152); "
        "no budget API. Takes the same settings as serve.",
    )
    control.add_argument("--config", type=Path, default=None, help="YAML file of settings (lowest precedence)")
    _add_setting_flags(control)

    usage = commands.add_parser("usage", help="read the usage events (billing) from Redis")
    usage_commands = usage.add_subparsers(dest="usage_command", required=True, parser_class=_Parser)
    export = usage_commands.add_parser("export", help="write usage events as CloudEvents 1.0 JSON lines")
    export.add_argument("--since", required=True, help="ISO 8601 time, epoch milliseconds, or an age like 15m, 24h, 7d")
    export.add_argument("--until", default=None, help="same forms as --since (default: now)")
    export.add_argument("--tenant", default=None, help="one tenant (default: every tenant)")
    export.add_argument("--output", type=Path, default=None, help="file to write (default: standard output)")
    _redis_flags(export)
    summary = usage_commands.add_parser("summary", help="totals of tokens and cost, grouped")
    _tenant_flag(summary)
    summary.add_argument("--by", default="task_type", help="task_type, model, task_id, outcome or label:KEY")
    summary.add_argument("--since", default="0", help="ISO 8601 time, epoch milliseconds, or an age (default: all)")
    summary.add_argument("--until", default=None)
    _redis_flags(summary)

    policy = commands.add_parser("policy", help="work with policy files")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, parser_class=_Parser)
    validate = policy_commands.add_parser("validate", help="check a policy file; errors name the line and field")
    validate.add_argument("file", type=Path)
    explain = policy_commands.add_parser(
        "explain", help="show the decision the rules would take for a step, and why (Redis is not touched)"
    )
    explain.add_argument("--policy-file", type=Path, default=None, help="policy file (default: the built-in one)")
    _tenant_flag(explain, "tenant whose windows apply")
    explain.add_argument("--task-type", default="", help="task type (default: the policy's)")
    explain.add_argument("--model", default="", help="model the step would call")
    explain.add_argument("--tokens", type=TOKENS, required=True, help="tokens asked for (counted as input)")
    explain.add_argument("--output-tokens", type=TOKENS, default=0, help="max output tokens, on top of --tokens")
    explain.add_argument("--tool-calls", type=TOOL_CALLS, default=0, help="planned tool calls")
    explain.add_argument("--used", type=LIMIT_TOKENS, default=0, help="tokens the task has used (and holds) already")
    explain.add_argument("--used-usd", type=LIMIT_USD, default=0.0, help="USD the task has used already")
    explain.add_argument(
        "--window-used", type=LIMIT_TOKENS, default=0, help="tokens used in each tenant window already"
    )

    inject = commands.add_parser(
        "inject-webhook",
        help="run the Kubernetes sidecar-injection webhook (HTTPS, admission.k8s.io/v1)",
        description='Mutating admission webhook: POST /mutate (pods opting in with budgetwarden.io/inject: "true"; '
        "every pod not opting out with --inject-all), POST /mutate-all (every pod not opting out, for namespaces "
        "labelled budgetwarden.io/inject=enabled), GET /healthz and /readyz.",
    )
    add_inject_arguments(inject)
    return parser


def _redis_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BUDGETWARDEN_REDIS_URL"),
        help="Redis URL [env BUDGETWARDEN_REDIS_URL; default: the embedded server's socket in --data-dir]",
    )
    parser.add_argument("--redis-cluster", action="store_true", help="the URL is a Redis Cluster seed node")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("BUDGETWARDEN_DATA_DIR", ".budgetwarden")),
        help="the running embedded server's data dir [env BUDGETWARDEN_DATA_DIR; default .budgetwarden]",
    )


ADMIN_TOKEN_ENV = "BUDGETWARDEN_ADMIN_TOKEN"


def _admin_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin-addr",
        default=None,
        help="the admin API: the control plane's, or a sidecar's (served only with --admin-listen) "
        "[env BUDGETWARDEN_ADMIN_ADDR; default 127.0.0.1:50152]",
    )
    _timeout_flag(parser)
    parser.add_argument("--json", action="store_true", help="print the response as JSON")
    parser.add_argument(
        "--token-file",
        type=Path,
        default=os.environ.get("BUDGETWARDEN_ADMIN_TOKEN_FILE") or None,
        help=f"file holding a bearer token [env BUDGETWARDEN_ADMIN_TOKEN_FILE; or the token in {ADMIN_TOKEN_ENV}]",
    )
    parser.add_argument(
        "--tls-ca-file",
        type=Path,
        default=os.environ.get("BUDGETWARDEN_ADMIN_TLS_CA_FILE") or None,
        help="CA that signs the admin listener's certificate: connect with TLS [env BUDGETWARDEN_ADMIN_TLS_CA_FILE]",
    )
    parser.add_argument(
        "--tls-cert-file",
        type=Path,
        default=os.environ.get("BUDGETWARDEN_ADMIN_TLS_CERT_FILE") or None,
        help="client certificate (mutual TLS), with --tls-key-file [env BUDGETWARDEN_ADMIN_TLS_CERT_FILE]",
    )
    parser.add_argument(
        "--tls-key-file",
        type=Path,
        default=os.environ.get("BUDGETWARDEN_ADMIN_TLS_KEY_FILE") or None,
        help="private key of --tls-cert-file [env BUDGETWARDEN_ADMIN_TLS_KEY_FILE]",
    )


def _labels(pairs: Sequence[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--label {pair!r}: expected KEY=VALUE")
        labels[key] = value
    return labels


def _ts(message: Any, field: str) -> str:
    if not message.HasField(field):
        return "-"
    return str(getattr(message, field).ToDatetime(tzinfo=UTC).isoformat(timespec="seconds"))


def _scope_table(scopes: Sequence[pb.ScopeState]) -> list[str]:
    rows = [("scope", "limit", "used", "reserved", "remaining", "resets at")]
    for s in scopes:
        limit = str(s.limit_tokens) if s.HasField("limit_tokens") else "-"
        remaining = str(s.remaining_tokens) if s.HasField("remaining_tokens") else "-"
        resets = _ts(s, "resets_at")
        rows.append((s.name, limit, str(s.used_tokens), str(s.reserved_tokens), remaining, resets))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.ljust(widths[i]) if i in (0, 5) else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]


def _print(message: Any, as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2, sort_keys=True))
    else:
        print("\n".join(lines))


def _enum(enum_type: Any, value: int, prefix: str) -> str:
    return str(enum_type.Name(value)).removeprefix(prefix)


def _cmd_check(args: argparse.Namespace, client: BudgetClient) -> int:
    input_tokens = args.input_tokens + (args.tokens or 0)
    fields: dict[str, Any] = {
        "tenant_id": args.tenant,
        "task_id": args.task,
        "step_id": args.step,
        "task_type": args.task_type,
        "model": args.model,
        "estimated_input_tokens": input_tokens,
        "max_output_tokens": args.output_tokens,
        "planned_tool_calls": args.tool_calls,
        "labels": _labels(args.label),
    }
    if args.lease is not None:
        fields["lease_seconds"] = args.lease
    if args.ceiling is not None:
        fields["task_ceiling_tokens"] = args.ceiling
    answer = client.check(**fields)
    decision = _enum(pb.Decision, answer.decision, "DECISION_")
    head = f"{decision}: granted {answer.granted_tokens} of {answer.requested_tokens} tokens"
    if answer.reservation_id:
        head += f", reservation {answer.reservation_id}, lease until {_ts(answer, 'lease_expires_at')}"
    lines = [head, f"reason: {_enum(pb.Reason, answer.reason, 'REASON_')}: {answer.message}"]
    if answer.binding_scope:
        lines.append(f"bound by: {answer.binding_scope}")
    if answer.HasField("retry_after"):
        lines.append(f"retry after: {answer.retry_after.ToTimedelta().total_seconds():.0f}s")
    if answer.from_fail_mode:
        lines.append("note: answered by the fail mode (budget store unavailable)")
    if answer.replayed:
        lines.append("note: this step was checked before; this is its reservation")
    if answer.scopes:
        lines += ["", *_scope_table(answer.scopes)]
    _print(answer, args.json, lines)
    return EXIT_OK if answer.decision in (pb.DECISION_ALLOW, pb.DECISION_DEGRADE) else EXIT_DENIED


_USAGE_FLAGS = ("input_tokens", "output_tokens", "cached_input_tokens", "tool_calls")


def _cmd_report(args: argparse.Namespace, client: BudgetClient) -> int:
    if not args.reservation and not (args.task and args.step):
        raise CliError("give --reservation, or --task and --step")
    if args.outcome == "completed" and all(getattr(args, name) is None for name in _USAGE_FLAGS):
        raise UsageError(
            "give what the step spent: --input-tokens, --output-tokens, --cached-input-tokens or --tool-calls "
            "(a step that did not complete: --outcome failed or cancelled; to hand back a reservation unused: "
            "budgetwarden release)"
        )
    record = pb.UsageRecord(
        tenant_id=args.tenant,
        reservation_id=args.reservation,
        task_id=args.task,
        step_id=args.step,
        model=args.model,
        task_type=args.task_type,
        input_tokens=args.input_tokens or 0,
        output_tokens=args.output_tokens or 0,
        cached_input_tokens=args.cached_input_tokens or 0,
        tool_calls=args.tool_calls or 0,
        outcome=pb.Outcome.Value(f"OUTCOME_{args.outcome.upper()}"),
        idempotency_key=args.idempotency_key,
    )
    record.timestamp.GetCurrentTime()
    result = client.report([record]).results[0]
    line = (
        f"{_enum(pb.ReportStatus, result.status, 'REPORT_STATUS_')}: charged {result.charged_tokens} tokens, "
        f"refunded {result.refunded_tokens}, overage {result.overage_tokens}"
    )
    if result.HasField("task_remaining_tokens"):
        line += f"; task has {result.task_remaining_tokens} tokens left"
    _print(result, args.json, [line])
    return EXIT_OK


def _cmd_release(args: argparse.Namespace, client: BudgetClient) -> int:
    if not args.reservation and not (args.task and args.step):
        raise CliError("give --reservation, or --task and --step")
    answer = client.release(
        tenant_id=args.tenant, reservation_id=args.reservation, task_id=args.task, step_id=args.step
    )
    status = _enum(pb.ReleaseStatus, answer.status, "RELEASE_STATUS_")
    _print(
        answer,
        args.json,
        [f"{status}: {answer.released_tokens} tokens handed back (reservation {answer.reservation_id})"],
    )
    return EXIT_OK


def _cmd_budget(args: argparse.Namespace, client: BudgetClient) -> int:
    answer = client.get_budget(tenant_id=args.tenant, task_id=args.task, task_type=args.task_type)
    lines = []
    if args.task:
        known = (
            f"task type {answer.task_type}, {answer.active_reservations} live reservations"
            if answer.task_known
            else "not checked yet"
        )
        lines.append(f"task {args.task}: {known}")
        if answer.HasField("checkpoint"):
            lines.append(
                f"open checkpoint: {answer.checkpoint.id} (since {_ts(answer.checkpoint, 'opened_at')}); "
                f"budgetwarden approve {answer.checkpoint.id} --add N, or budgetwarden deny"
            )
        if answer.task_closed:
            lines.append("task closed: a checkpoint was denied; every further check is denied")
    lines += _scope_table(answer.scopes)
    _print(answer, args.json, lines)
    return EXIT_OK


def _cmd_policy_validate(args: argparse.Namespace) -> int:
    loaded = load_policy(args.file)
    policy = loaded.policy
    print(
        f"{args.file}: valid (version {loaded.version}): {len(policy.tenants)} tenants, "
        f"{len(policy.task_types)} task types, {len(policy.models)} models, unknown tenants: {policy.unknown_tenants}"
    )
    return EXIT_OK


def _cmd_policy_explain(args: argparse.Namespace) -> int:
    explained = explain(
        load_policy(args.policy_file) if args.policy_file else default_policy(),
        tenant_id=args.tenant,
        task_type=args.task_type,
        model=args.model,
        tokens=args.tokens,
        output_tokens=args.output_tokens,
        tool_calls=args.tool_calls,
        used=args.used,
        used_usd=usd_to_micros(args.used_usd),
        window_used=args.window_used,
        now_ms=int(time.time() * 1000),
    )
    print(explained.text)
    return EXIT_OK


_AGE = re.compile(r"^(\d+)([smhd])$")
_AGE_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def _time_ms(text: str, flag: str) -> int:
    """ISO 8601, epoch milliseconds, or an age before now (15m, 24h, 7d)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    age = _AGE.match(text)
    if age:
        return int(time.time() * 1000) - int(age.group(1)) * _AGE_MS[age.group(2)]
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"{flag} {text!r}: expected an ISO 8601 time, epoch milliseconds, or an age like 24h") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _usage_client(args: argparse.Namespace) -> Any:
    import redis

    url = args.redis_url or f"unix://{(args.data_dir / 'redis.sock').resolve()}"
    flag = "--redis-url (or BUDGETWARDEN_REDIS_URL)"
    if not url.startswith(REDIS_SCHEMES):
        scheme = url.partition("://")[0] if "://" in url else url  # not the whole URL: it may hold a password
        accepted = ", ".join(REDIS_SCHEMES[:2] if args.redis_cluster else REDIS_SCHEMES)
        raise UsageError(f"{flag}: {scheme!r} is not a Redis URL; expected one starting with {accepted}")
    from budgetwarden.app import redis_access_options
    from budgetwarden.store import is_sentinel_url, parse_sentinel_url, sync_sentinel_master

    # The same BUDGETWARDEN_REDIS_* credentials and TLS settings as the sidecar's, from the environment.
    access = redis_access_options(load_settings(redis_url=url)) if args.redis_url else {}
    try:
        if args.redis_cluster:
            return redis.RedisCluster.from_url(url, **access)
        if is_sentinel_url(url):
            return sync_sentinel_master(parse_sentinel_url(url), access)
        return redis.Redis.from_url(url, **access)
    except (ValueError, redis.RedisError) as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _cmd_usage(args: argparse.Namespace) -> int:
    import redis

    from budgetwarden.store import read_events

    since = _time_ms(args.since, "--since")
    until = None if args.until is None else _time_ms(args.until, "--until")
    client = _usage_client(args)
    try:
        events = read_events(client, args.tenant, since, until)
        if args.usage_command == "export":
            out = args.output.open("w") if args.output else sys.stdout
            count = 0
            try:
                for event in events:
                    out.write(json.dumps(event.cloudevent(), separators=(",", ":")) + "\n")
                    count += 1
            finally:
                if args.output:
                    out.close()
            print(f"exported {count} usage events", file=sys.stderr)
            return EXIT_OK
        return _print_summary(args, events)
    except redis.RedisError as exc:
        raise CliError(f"cannot read usage events from Redis: {exc}") from None
    finally:
        client.close()


def _print_summary(args: argparse.Namespace, events: Any) -> int:
    by: str = args.by
    if by.startswith("label:"):
        label = by.removeprefix("label:")

        def key_of(data: dict[str, Any]) -> str:
            return str(data.get("labels", {}).get(label, "(none)"))
    elif by in ("task_type", "model", "task_id", "outcome"):

        def key_of(data: dict[str, Any]) -> str:
            return str(data.get(by) or "(none)")
    else:
        raise CliError(f"--by {by!r}: expected task_type, model, task_id, outcome or label:KEY")
    totals: dict[str, list[int]] = {}
    for event in events:
        data = event.data
        sums = totals.setdefault(key_of(data), [0, 0, 0, 0, 0])
        sums[0] += 1
        sums[1] += data["input_tokens"]
        sums[2] += data["cached_input_tokens"]
        sums[3] += data["output_tokens"]
        sums[4] += data["cost_usd_micros"]
    rows = [(by, "events", "input", "cached", "output", "tokens", "cost usd")]
    for key in sorted(totals):
        n, inp, cached, out, cost = totals[key]
        rows.append((key, str(n), str(inp), str(cached), str(out), str(inp + out), usd_text(cost)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
    return EXIT_OK


def _admin_addr(args: argparse.Namespace) -> str:
    return str(args.admin_addr or os.environ.get("BUDGETWARDEN_ADMIN_ADDR", DEFAULT_ADMIN_ADDR))


def _admin_token(args: argparse.Namespace) -> str | None:
    """--token-file (or BUDGETWARDEN_ADMIN_TOKEN_FILE), else BUDGETWARDEN_ADMIN_TOKEN; None: send no token."""
    if args.token_file is not None:
        try:
            token: str = args.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"--token-file {args.token_file}: cannot read it: {exc}") from None
        if not token:
            raise CliError(f"--token-file {args.token_file}: the file is empty")
        return token
    return str(os.environ.get(ADMIN_TOKEN_ENV, "")).strip() or None


def _read_pem(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"{flag} {path}: cannot read it: {exc}") from None


@contextlib.contextmanager
def _admin_stub(args: argparse.Namespace) -> Iterator[tuple[Any, list[tuple[str, str]]]]:
    """A stub of BudgetAdminService and the metadata every call sends: TLS when a CA or a client certificate is given
    (mutual TLS with the certificate), a bearer token when one is given."""
    from budgetwarden_api.v1 import admin_pb2_grpc

    if (args.tls_cert_file is None) != (args.tls_key_file is None):
        raise UsageError("--tls-cert-file and --tls-key-file go together")
    token = _admin_token(args)
    addr = _admin_addr(args)
    tls = None
    if args.tls_ca_file is not None or args.tls_cert_file is not None:
        for path, flag in ((args.tls_ca_file, "--tls-ca-file"), (args.tls_cert_file, "--tls-cert-file"),
                           (args.tls_key_file, "--tls-key-file")):  # fmt: skip
            _read_pem(path, flag)  # one line naming the flag, not a traceback from grpc
        tls = ClientTls(ca_file=args.tls_ca_file, cert_file=args.tls_cert_file, key_file=args.tls_key_file)
    channel = open_channel(addr, tls=tls)
    metadata = list(bearer_metadata(token)) if token else []
    try:
        yield admin_pb2_grpc.BudgetAdminServiceStub(channel), metadata
    finally:
        channel.close()


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    with _admin_stub(args) as (stub, metadata):
        call = {"timeout": args.timeout, "metadata": metadata}
        if args.command == "approve":
            request = admin_pb.ApproveCheckpointRequest(
                checkpoint_id=args.checkpoint, add_tokens=args.add, add_usd_micros=usd_to_micros(args.add_usd)
            )
            answer: Any = stub.ApproveCheckpoint(request, **call)
        else:
            answer = stub.DenyCheckpoint(admin_pb.DenyCheckpointRequest(checkpoint_id=args.checkpoint), **call)
    outcome = _enum(admin_pb.CheckpointOutcome, answer.outcome, "CHECKPOINT_OUTCOME_")
    lines = [f"{outcome}: {args.checkpoint}"]
    if args.command == "approve" and answer.HasField("task"):
        lines += _scope_table([answer.task])
    _print(answer, args.json, lines)
    bad = (admin_pb.CHECKPOINT_OUTCOME_NOT_FOUND, admin_pb.CHECKPOINT_OUTCOME_CONFLICT)
    return EXIT_ERROR if answer.outcome in bad else EXIT_OK


_CHECKPOINT_STATES = {
    admin_pb.CHECKPOINT_STATE_OPEN: "open",
    admin_pb.CHECKPOINT_STATE_APPROVED: "approved",
    admin_pb.CHECKPOINT_STATE_DENIED: "denied",
}


def _checkpoint_rows(checkpoints: Sequence[Any], decided: bool) -> list[str]:
    head: tuple[str, ...] = ("checkpoint", "task", "task type", "opened at")
    head += ("state", "decided at", "added") if decided else ("used", "limit")
    rows = [head]
    for c in checkpoints:
        row: tuple[str, ...] = (c.checkpoint_id, c.task_id, c.task_type or "-", _ts(c, "opened_at"))
        if decided:
            row += (_CHECKPOINT_STATES.get(c.state, "?"), _ts(c, "decided_at"), str(c.added_tokens))
        else:
            task = c.task
            limit = str(task.limit_tokens) if c.HasField("task") and task.HasField("limit_tokens") else "-"
            row += (str(task.used_tokens + task.reserved_tokens) if c.HasField("task") else "-", limit)
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def _cmd_checkpoints_list(args: argparse.Namespace) -> int:
    token = args.page_token
    listed: list[Any] = []
    filter_ = admin_pb.CHECKPOINT_FILTER_DECIDED if args.decided else admin_pb.CHECKPOINT_FILTER_OPEN
    with _admin_stub(args) as (stub, metadata):
        while True:
            request = admin_pb.ListCheckpointsRequest(
                tenant_id=args.tenant, filter=filter_, page_size=args.page_size, page_token=token
            )
            answer = stub.ListCheckpoints(request, timeout=args.timeout, metadata=metadata)
            listed += answer.checkpoints
            token = answer.next_page_token
            if not (args.all and token):
                break
    if args.json:
        result = {
            "checkpoints": [MessageToDict(c, preserving_proto_field_name=True) for c in listed],
            "next_page_token": token,
        }
        print(json.dumps(result, indent=2, sort_keys=True))
        return EXIT_OK
    what = "decided" if args.decided else "open"
    if not listed:
        print(f"no {what} checkpoints for tenant {args.tenant}")
    else:
        print("\n".join(_checkpoint_rows(listed, args.decided)))
    if token:
        print(f"more: --page-token {token}", file=sys.stderr)
    return EXIT_OK


def _cmd_admin_token(args: argparse.Namespace) -> int:
    from budgetwarden.transport import new_token, token_digest

    token = new_token()
    tenants: Any = "*" if "*" in args.tenant else sorted(set(args.tenant))
    entry = {"name": args.name, "sha256": token_digest(token), "role": args.role, "tenants": tenants}
    print(token)
    print(
        "# The token above is shown once; hand it to its holder. Add this entry under `tokens:` in the admin tokens "
        "file:",
        file=sys.stderr,
    )
    print("  - " + json.dumps(entry), file=sys.stderr)
    return EXIT_OK


def _cmd_audit(args: argparse.Namespace) -> int:
    import redis

    from budgetwarden.store import read_audit

    since = _time_ms(args.since, "--since")
    until = None if args.until is None else _time_ms(args.until, "--until")
    client = _usage_client(args)
    try:
        out = args.output.open("w") if args.output else sys.stdout
        count = 0
        try:
            for record in read_audit(client, args.tenant, since, until):
                out.write(json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n")
                count += 1
        finally:
            if args.output:
                out.close()
        print(f"exported {count} audit entries", file=sys.stderr)
        return EXIT_OK
    except redis.RedisError as exc:
        raise CliError(f"cannot read the audit trail from Redis: {exc}") from None
    finally:
        client.close()


def _cmd_control_plane(args: argparse.Namespace) -> int:
    from budgetwarden.app import configure_logging, serve_control_plane

    settings = _settings_of(args)
    configure_logging(settings.log_level, settings.log_format)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_control_plane(settings))
    return EXIT_OK


def _settings_of(args: argparse.Namespace) -> Settings:
    flags = {name: getattr(args, name) for name in Settings.model_fields}
    config = args.config
    if config is None:
        env_config = os.environ.get("BUDGETWARDEN_CONFIG")
        config = Path(env_config) if env_config else None
    return load_settings(config, **flags)


def _cmd_serve(args: argparse.Namespace) -> int:
    from budgetwarden.app import configure_logging, serve

    settings = _settings_of(args)
    configure_logging(settings.log_level, settings.log_format)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings))
    return EXIT_OK


def _cmd_inject_webhook(args: argparse.Namespace) -> int:
    from budgetwarden import inject
    from budgetwarden.app import configure_logging

    try:
        if args.print_ca_bundle:
            print(inject.ca_bundle(args))
            return EXIT_OK
        config = inject.config_from_args(args)
        configure_logging(config.log_level, config.log_format)
        inject.run(config)
    except inject.InjectConfigError as exc:
        print(f"budgetwarden inject-webhook: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except inject.InjectError as exc:
        raise CliError(str(exc)) from None
    return EXIT_OK


_CLIENT_COMMANDS = {"check": _cmd_check, "report": _cmd_report, "release": _cmd_release, "budget": _cmd_budget}


def _store_unavailable(exc: grpc.RpcError) -> bool:
    """Whether the sidecar itself answered UNAVAILABLE because its budget store is down (ErrorInfo STORE_UNAVAILABLE),
    as against a sidecar that could not be reached."""
    from budgetwarden.transport import ERROR_DOMAIN, STORE_UNAVAILABLE  # here: the transport loads redis

    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except (AttributeError, ValueError):
        return False
    for detail in status.details if status is not None else ():
        info = ErrorInfo()
        if detail.Unpack(info) and (info.domain, info.reason) == (ERROR_DOMAIN, STORE_UNAVAILABLE):
            return True
    return False


def _rpc_error_line(args: argparse.Namespace, exc: grpc.RpcError) -> str:
    """One line that says what failed, where, and the way out."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    admin = args.command in ADMIN_COMMANDS
    where = _admin_addr(args) if admin else (args.addr or default_addr())
    if code == grpc.StatusCode.UNAVAILABLE and _store_unavailable(exc):
        return (
            f"the sidecar at {where} answered, but its budget store (Redis) is unavailable: {details}; "
            "check the Redis the sidecar uses (its --redis-url, or its embedded server) and try again"
        )
    if code == grpc.StatusCode.UNAUTHENTICATED and admin:
        return (
            f"UNAUTHENTICATED: the admin API at {where} wants credentials: {details}; give --token-file (or "
            f"{ADMIN_TOKEN_ENV}), or a client certificate with --tls-cert-file and --tls-key-file"
        )
    if code == grpc.StatusCode.UNAVAILABLE and admin:
        return (
            f"cannot reach the admin listener at {where}: {details}; a sidecar serves the admin API only when started "
            "with --admin-listen (BUDGETWARDEN_ADMIN_LISTEN); point --admin-addr (BUDGETWARDEN_ADMIN_ADDR) at it"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"cannot reach the sidecar at {where}: {details}; is `budgetwarden serve` running there? "
            "Point --addr (BUDGETWARDEN_ADDR) at it"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer from {where} within {args.timeout:g} s: {details}; try again, or give a longer --timeout"
    name = code.name if code is not None else "ERROR"
    return f"{name}: {details}"


_TENANT_COMMANDS = {"check", "report", "release", "budget"}
ADMIN_COMMANDS = ("approve", "deny", "checkpoints")
_SUBCOMMANDS = ("policy_command", "usage_command", "checkpoints_command", "admin_token_command", "audit_command")


def _missing_tenant(args: argparse.Namespace) -> bool:
    takes_tenant = (
        args.command in _TENANT_COMMANDS
        or (args.command == "policy" and args.policy_command == "explain")
        or (args.command == "usage" and args.usage_command == "summary")
        or args.command == "checkpoints"
    )
    return takes_tenant and args.tenant is None


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    subcommand = next((getattr(args, name) for name in _SUBCOMMANDS if getattr(args, name, None)), None)
    prog = " ".join(filter(None, ("budgetwarden", args.command, subcommand)))  # as argparse names it
    if _missing_tenant(args):
        print(f"{prog}: error: give --tenant, or set {TENANT_ENV}: the tenant whose budget this is", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "inject-webhook":
            return _cmd_inject_webhook(args)
        if args.command == "policy":
            return _cmd_policy_validate(args) if args.policy_command == "validate" else _cmd_policy_explain(args)
        if args.command in ("approve", "deny"):
            return _cmd_checkpoint(args)
        if args.command == "checkpoints":
            return _cmd_checkpoints_list(args)
        if args.command == "admin-token":
            return _cmd_admin_token(args)
        if args.command == "audit":
            return _cmd_audit(args)
        if args.command == "control-plane":
            return _cmd_control_plane(args)
        if args.command == "usage":
            return _cmd_usage(args)
        with BudgetClient(args.addr or default_addr(), timeout=args.timeout) as client:
            return _CLIENT_COMMANDS[args.command](args, client)
    except grpc.RpcError as exc:
        print(f"{prog}: error: {_rpc_error_line(args, exc)}", file=sys.stderr)
        return EXIT_ERROR
    except PolicyError as exc:
        for problem in exc.problems:
            print(f"{exc.source}:{problem}", file=sys.stderr)
        return EXIT_ERROR
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        setting = f"setting {where}: " if where else "setting "  # a rule across settings names them itself
        print(f"{prog}: error: {setting}{first['msg']}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CliError, ConfigFileError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
