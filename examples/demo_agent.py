"""The budgetwarden demo: one research task walked through ALLOW, DEGRADE, CHECKPOINT, an approval, ALLOW and DENY.

    make demo                               # or: .venv/bin/python examples/demo_agent.py

Offline, and it cleans up after itself. It starts a sidecar (``budgetwarden serve`` with the embedded
Redis-compatible server, ``examples/demo-policy.yaml``, an admin listener, free ports and a temporary data dir) and a
scripted OpenAI-compatible model server (``examples/scripted_openai``), runs the agent, and stops both.

The agent is an ordinary tool-calling loop over the ``openai`` SDK. budgetwarden's step API wraps each model call:
``budget.step(...)`` checks the step first; a DEGRADE's advice is applied (``step.model``, ``step.max_tokens``,
``step.trim(messages)``); the usage the SDK returns is reported when the block ends. A CHECKPOINT stops the agent
until an operator approves it (here the demo plays the operator, through the admin API, as ``budgetwarden approve``
does); a DENY ends the task. Each step's decision, model, cost and the remaining budget are shown as they happen: a
live table in a terminal, a line per step otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessage
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from budgetwarden_client import (
    AdminClient,
    Budget,
    BudgetDenied,
    CheckpointRequired,
    Step,
    admin_pb,
    pb,
)
from scripted_openai import RecordedRequest, Reply, ScriptedOpenAI, ToolCall

EXAMPLES = Path(__file__).resolve().parent
POLICY_FILE = EXAMPLES / "demo-policy.yaml"

TENANT = "demo"
TASK_ID = "research-42"
MODEL = "gpt-4o"
MAX_OUTPUT_TOKENS = 300
# What the operator grants at the checkpoint: enough for the task to go on undegraded for a step, not for the team's
# day (the policy's tenant window), which ends the task.
APPROVED_TOKENS = 4000

# Generous bounds, so that a busy machine slows the demo down rather than breaking it: the sidecar counts prompts
# within its check deadline (past it, it would estimate, and the walk's figures would move).
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
CHECK_TIMEOUT = 30.0
CHECK_DEADLINE_MS = 20_000
START_ATTEMPTS = 3

SYSTEM = (
    "You are a research agent. Plan, fetch sources with the fetch_source tool, then write a short report with "
    "citations."
)
QUESTION = "How should a platform team keep the token spending of autonomous AI agents under control?"
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "fetch_source",
            "description": "Fetch a source document by its URL and return its text.",
            "parameters": {
                "type": "object",
                "properties": {"url": {"type": "string"}},
                "required": ["url"],
            },
        },
    }
]


@dataclass(frozen=True)
class PlannedStep:
    step_id: str
    intent: str
    reply: Reply  # what the scripted model answers to this step


def _fetch(url: str) -> Reply:
    return Reply(text=None, tool_calls=[ToolCall("fetch_source", {"url": url})])


PLAN = [
    PlannedStep("step-1", "plan", _fetch("https://example.org/metering-vs-budgets")),
    PlannedStep("step-2", "read source 1", _fetch("https://example.org/runaway-agents")),
    PlannedStep("step-3", "read source 2", _fetch("https://example.org/degrade-ladders")),
    PlannedStep("step-4", "read source 3", _fetch("https://example.org/approvals")),
    PlannedStep("step-5", "write the report", Reply(text="Report: meter every token, but budget every step.")),
]

# The text each fetched source returns: long enough that the context grows step by step, as in a real research agent.
SOURCE_TEXT = (
    "Per-token metering tells a team afterwards who spent what; it does not stop a runaway task. An agent that "
    "loops on a failing tool call, or re-reads a growing context at every step, can spend a day's budget in "
    "minutes. A budget checked before each step turns the spending into a control loop: the step is allowed, made "
    "cheaper, stopped for a human decision, or refused. "
)
SOURCE_REPEATS = 4


def source_text(url: str) -> str:
    return f"[{url}] " + SOURCE_TEXT * SOURCE_REPEATS


class DemoError(Exception):
    """Something the demo depends on failed (the sidecar did not start, a report was not delivered)."""


# --- the services the demo starts -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Sidecar:
    """A ``budgetwarden serve`` child process with the embedded server, on free ports, in a temporary data dir."""

    addr: str
    admin_addr: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _serve_command(addr: str, admin_addr: str, data_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "budgetwarden",
        "serve",
        "--policy-file",
        str(POLICY_FILE),
        "--listen",
        addr,
        "--admin-listen",
        admin_addr,
        "--data-dir",
        str(data_dir),
        "--check-deadline-ms",
        str(CHECK_DEADLINE_MS),
        "--log-format",
        "text",
        "--log-level",
        "WARNING",
    ]


def _serving(addr: str) -> bool:
    """True once the sidecar is ready: its health service answers SERVING (the store answers too)."""
    with grpc.insecure_channel(addr) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the sidecar drains, then stops its embedded server), SIGKILL if it does not exit in time."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT)


class _PortTakenError(Exception):
    """A port picked as free was taken before the sidecar bound it: try again on others."""


def _start_once(workdir: Path, attempt: int) -> Sidecar:
    """``budgetwarden serve`` on two free ports, once it serves."""
    addr, admin_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    log_path = workdir / f"sidecar-{attempt}.log"
    # The embedded default, whatever the shell says: no BUDGETWARDEN_* setting (a Redis URL, a tenant) applies.
    env = {key: value for key, value in os.environ.items() if not key.startswith("BUDGETWARDEN_")}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            _serve_command(addr, admin_addr, workdir / f"data-{attempt}"),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
        )
    sidecar = Sidecar(addr, admin_addr, process, log_path)
    try:
        _wait_serving(sidecar)
    except BaseException:  # Ctrl-C too: the process is not in anyone's hands yet
        _stop(process)
        raise
    return sidecar


def _wait_serving(sidecar: Sidecar) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not _serving(sidecar.addr):
        if sidecar.process.poll() is not None:
            if "address is in use" in sidecar.log_tail():
                raise _PortTakenError
            raise DemoError(f"the sidecar exited before serving:\n{sidecar.log_tail()}")
        if time.monotonic() > deadline:
            raise DemoError(f"the sidecar did not serve within {READY_TIMEOUT:.0f} s:\n{sidecar.log_tail()}")
        time.sleep(0.1)


@contextlib.contextmanager
def running_sidecar() -> Iterator[Sidecar]:
    """A sidecar for the demo, stopped (and its data dir removed) on the way out."""
    with tempfile.TemporaryDirectory(prefix="budgetwarden-demo-") as workdir:
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                sidecar = _start_once(Path(workdir), attempt)
                break
            except _PortTakenError:
                if attempt == START_ATTEMPTS:
                    raise DemoError(f"no free ports after {START_ATTEMPTS} tries") from None
        try:
            yield sidecar
        finally:
            _stop(sidecar.process)


def scripted_model() -> ScriptedOpenAI:
    """The model server: the n-th model call gets the plan's n-th reply, whichever model it asks for (a degraded
    step calls the cheaper one)."""
    replies = iter([planned.reply for planned in PLAN])
    final = Reply(text="Done.")

    def respond(_request: RecordedRequest) -> Reply:
        return next(replies, final)

    return ScriptedOpenAI({MODEL: respond, "gpt-4o-mini": respond})


# --- what the terminal shows ------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """The task's and the team's day figures as the sidecar has them (used and held), from ``GetBudget``."""

    task_used: int = 0
    task_limit: int | None = None
    task_cost_micros: int = 0
    day_used: int = 0
    day_limit: int | None = None

    @property
    def remaining(self) -> int | None:
        """The least of what is left for the task and the team's day (None: neither has a limit)."""
        scopes = ((self.task_limit, self.task_used), (self.day_limit, self.day_used))
        left = [limit - used for limit, used in scopes if limit is not None]
        return max(0, min(left)) if left else None


def read_ledger(budget: Budget) -> Ledger:
    answer = budget.client.get_budget(tenant_id=TENANT, task_id=TASK_ID)
    scopes = {scope.name: scope for scope in answer.scopes}
    ledger = Ledger()
    if (task := scopes.get("task")) is not None:
        ledger.task_used = task.used_tokens + task.reserved_tokens
        ledger.task_limit = task.limit_tokens if task.HasField("limit_tokens") else None
        ledger.task_cost_micros = task.used_usd_micros + task.reserved_usd_micros
    if (day := scopes.get("tenant.day")) is not None:
        ledger.day_used = day.used_tokens + day.reserved_tokens
        ledger.day_limit = day.limit_tokens if day.HasField("limit_tokens") else None
    return ledger


@dataclass
class Row:
    """One line of the walk: a step's decision (or the operator's approval) and the figures after it. ``summary`` is
    what the live table shows of ``detail`` (the plain lines show all of it)."""

    step: str
    intent: str
    decision: str
    reason: str
    ledger: Ledger
    model: str = "-"
    tokens: str = "-"
    cost_micros: int | None = None
    detail: str = ""
    summary: str = ""

    def why(self, detail: str) -> str:
        return f"{self.reason}: {detail}" if detail else self.reason


DECISION_STYLES = {
    "ALLOW": "bold green",
    "DEGRADE": "bold yellow",
    "CHECKPOINT": "bold magenta",
    "APPROVED": "bold cyan",
    "DENY": "bold red",
}


def usd(micros: int | None) -> str:
    return "-" if micros is None else f"${micros / 1_000_000:.4f}"


def of(used: int, limit: int | None) -> str:
    return f"{used:,}" if limit is None else f"{used:,}/{limit:,}"


def left(ledger: Ledger) -> str:
    return "unlimited" if ledger.remaining is None else f"{ledger.remaining:,}"


def plain_line(row: Row) -> str:
    """``STEP DECISION INTENT | model ... | ...``: one line, no colour, for pipes and logs."""
    ledger = row.ledger
    return " | ".join(
        [
            f"{row.step:<5} {row.decision:<10} {row.intent:<16}",
            f"model {row.model}",
            f"tokens in/out {row.tokens}",
            f"cost {usd(row.cost_micros)}",
            f"task {of(ledger.task_used, ledger.task_limit)} ({usd(ledger.task_cost_micros)})",
            f"day {of(ledger.day_used, ledger.day_limit)}",
            f"remaining {left(ledger)}",
            row.why(row.detail),
        ]
    )


COLUMNS = ("step", "intent", "decision", "model", "tokens in/out", "cost", "task tokens", "task cost", "remaining")


class Display:
    """A live table with budget bars in a terminal; a plain line per row otherwise (a pipe, a log, a test)."""

    def __init__(self, console: Console, pace: float) -> None:
        self.console = console
        self.pace = pace
        self.rows: list[Row] = []
        self.live: Live | None = None

    def __enter__(self) -> Display:
        if self.console.is_terminal:
            self.live = Live(self._render(), console=self.console, refresh_per_second=4)
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()

    @property
    def latest(self) -> Ledger:
        """The figures of the last row shown (zero before the first)."""
        return self.rows[-1].ledger if self.rows else Ledger()

    def add(self, row: Row) -> None:
        self.rows.append(row)
        if self.live is None:
            print(plain_line(row), flush=True)
            return
        self.live.update(self._render(), refresh=True)
        time.sleep(self.pace)  # time to read each step as it comes

    def _render(self) -> Group:
        table = Table(title=f"task {TASK_ID} of tenant {TENANT}", title_justify="left")
        for column in COLUMNS:
            table.add_column(column, justify="left" if column in COLUMNS[:4] else "right", no_wrap=True)
        table.add_column("why")
        for row in self.rows:
            ledger = row.ledger
            table.add_row(
                row.step,
                row.intent,
                Text(row.decision, style=DECISION_STYLES.get(row.decision, "")),
                row.model,
                row.tokens,
                usd(row.cost_micros),
                of(ledger.task_used, ledger.task_limit),
                usd(ledger.task_cost_micros),
                left(ledger),
                row.why(row.summary),
            )
        bars = Table.grid(padding=(0, 1))
        latest = self.latest
        for label, used, limit in (
            ("task budget", latest.task_used, latest.task_limit),
            ("team's day ", latest.day_used, latest.day_limit),
        ):
            total = float(limit or max(used, 1))
            bars.add_row(label, ProgressBar(total=total, completed=min(used, total), width=50), of(used, limit))
        return Group(table, bars)


# --- the agent --------------------------------------------------------------------------------------------------


@dataclass
class Called:
    """What one model call sent and got back (``model``: the one that answered)."""

    sent: Sequence[Any]
    model: str
    message: ChatCompletionMessage
    usage: CompletionUsage


def call_model(llm: openai.OpenAI, step: Step, messages: list[dict[str, Any]]) -> Called:
    """One model call with the step's advice applied, its usage recorded on the step (reported when it ends)."""
    sent = step.trim(messages)  # on DEGRADE: the system message and the most recent ones within the advised context
    reply = llm.chat.completions.create(
        model=step.model,
        messages=sent,  # type: ignore[arg-type]  # plain dicts, as an agent keeps its history
        tools=TOOLS,  # type: ignore[arg-type]
        max_tokens=step.max_tokens,
    )
    usage = reply.usage
    if usage is None:
        raise DemoError("the model server returned no usage")
    details = usage.prompt_tokens_details
    step.record_usage(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,  # reasoning tokens included, as OpenAI counts them
        cached_input_tokens=(details.cached_tokens or 0) if details else 0,
    )
    return Called(sent, reply.model, reply.choices[0].message, usage)


def run_tools(message: ChatCompletionMessage) -> list[dict[str, Any]]:
    """The tool results for the model's calls: fetch_source answers from canned text."""
    results = []
    for call in message.tool_calls or []:
        if call.type == "function":
            url = json.loads(call.function.arguments)["url"]
            results.append({"role": "tool", "tool_call_id": call.id, "content": source_text(url)})
    return results


def run_agent(budget: Budget, admin: AdminClient, llm: openai.OpenAI, display: Display) -> None:
    """The agent loop: each planned step is one model call under ``budget.step``; the tool results grow the context
    of the next. A checkpoint waits for an operator (the demo approves it); a denial ends the task."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    for number, planned in enumerate(PLAN, start=1):
        label = f"{number}/{len(PLAN)}"
        while True:  # a step stopped at a checkpoint is entered again once approved
            try:
                with budget.step(
                    TASK_ID,
                    planned.step_id,
                    model=MODEL,
                    messages=messages,
                    tools=TOOLS,
                    max_output_tokens=MAX_OUTPUT_TOKENS,
                ) as step:
                    called = call_model(llm, step, messages)
                break
            except CheckpointRequired as stop:
                display.add(stopped_row(budget, label, planned, stop))
                display.add(approve(budget, admin, stop.checkpoint_id, label))
            except BudgetDenied as denied:
                display.add(stopped_row(budget, label, planned, denied))
                return
        display.add(ran_row(budget, display.latest, label, planned, step, called, len(messages)))
        messages.append(called.message.model_dump(exclude_none=True))
        messages.extend(run_tools(called.message))


def ran_row(
    budget: Budget, previous: Ledger, label: str, planned: PlannedStep, step: Step, called: Called, context: int
) -> Row:
    """The row of a step that ran, once its usage is applied, so that the figures are what it cost rather than what
    it reserved. (An agent need not wait: its reports go in the background, and the next check counts the
    reservation meanwhile. The demo waits to show settled figures, the same every run.)"""
    if not budget.reporter.flush(timeout=CHECK_TIMEOUT):
        raise DemoError(f"the usage report was not delivered within {CHECK_TIMEOUT:.0f} s")
    ledger = read_ledger(budget)
    row = Row(
        step=label,
        intent=planned.intent,
        decision=pb.Decision.Name(step.decision).removeprefix("DECISION_"),
        reason=pb.Reason.Name(step.response.reason).removeprefix("REASON_"),
        ledger=ledger,
        model=called.model,
        tokens=f"{called.usage.prompt_tokens:,}/{called.usage.completion_tokens:,}",
        cost_micros=ledger.task_cost_micros - previous.task_cost_micros,
    )
    if step.decision == pb.DECISION_DEGRADE:
        context_cut = f"context {context} -> {len(called.sent)} messages"
        row.detail = (
            f"model {MODEL} -> {step.model}, {context_cut} (<= {step.max_context_tokens} tokens), "
            f"max_tokens {MAX_OUTPUT_TOKENS} -> {step.max_tokens}"
        )
        row.summary = f"{context_cut}, max_tokens {step.max_tokens}"
    return row


def stopped_row(budget: Budget, label: str, planned: PlannedStep, stop: CheckpointRequired | BudgetDenied) -> Row:
    """The row of a step that did not run: the sidecar's reason and message."""
    row = Row(
        step=label,
        intent=planned.intent,
        decision="CHECKPOINT" if isinstance(stop, CheckpointRequired) else "DENY",
        reason=pb.Reason.Name(stop.reason).removeprefix("REASON_"),
        ledger=read_ledger(budget),
        detail=stop.message,
    )
    if isinstance(stop, CheckpointRequired):
        row.summary = f"checkpoint {stop.checkpoint_id}"
    elif stop.retry_after is not None:
        hours, minutes = divmod(round(stop.retry_after / 60), 60)
        row.summary = f"retry after {hours}h{minutes:02d}m"
        row.detail += f" (retry after {hours}h{minutes:02d}m)"
    return row


def approve(budget: Budget, admin: AdminClient, checkpoint_id: str, label: str) -> Row:
    """What an operator does with ``budgetwarden approve CHECKPOINT_ID --add N``, through the admin API."""
    answer = admin.approve(checkpoint_id, add_tokens=APPROVED_TOKENS)
    command = f"budgetwarden approve {checkpoint_id} --add {APPROVED_TOKENS}"
    return Row(
        step=label,
        intent="operator",
        decision=admin_pb.CheckpointOutcome.Name(answer.outcome).removeprefix("CHECKPOINT_OUTCOME_"),
        reason=command,
        ledger=read_ledger(budget),
        detail="the task's ceiling is raised, its thresholds with it",
    )


# --- main -------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pace", type=float, default=0.8, help="seconds to show each step in a terminal (default 0.8)")
    args = parser.parse_args(argv)
    # SIGTERM ends the demo like Ctrl-C does: through the finally blocks that stop the sidecar and the model server.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    console = Console()
    try:
        with running_sidecar() as sidecar, scripted_model() as model_server:
            header(console, sidecar, model_server)
            with (
                Budget(sidecar.addr, tenant_id=TENANT, timeout=CHECK_TIMEOUT) as budget,
                AdminClient(sidecar.admin_addr, timeout=CHECK_TIMEOUT) as admin,
                openai.OpenAI(base_url=model_server.base_url, api_key="demo", max_retries=0) as llm,
                Display(console, args.pace) as display,
            ):
                run_agent(budget, admin, llm, display)
    except KeyboardInterrupt:
        print("interrupted: stopped the sidecar and the model server", file=sys.stderr)
        return 130
    except DemoError as error:
        print(f"demo_agent: {error}", file=sys.stderr)
        return 1
    console.print("stopped the sidecar and the model server", highlight=False)
    return 0


def header(console: Console, sidecar: Sidecar, model_server: ScriptedOpenAI) -> None:
    console.print(
        f"sidecar {sidecar.addr} (admin {sidecar.admin_addr}), embedded Redis-compatible server, "
        f"policy {POLICY_FILE.relative_to(EXAMPLES.parent)}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"scripted model server {model_server.base_url} ({', '.join(model_server.models)})", highlight=False)


if __name__ == "__main__":
    sys.exit(main())
