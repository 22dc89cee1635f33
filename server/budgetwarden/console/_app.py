"""The console's pages and actions.

Logging in hands an admin bearer token to a server-side session: the browser holds only a random session id (HttpOnly,
SameSite=Strict, Secure under TLS). Each request looks the token up in the admin tokens file again, so a revoked token
ends its sessions at the next click. Who may see and do what is the admin API's rule (``authorisation_refusal``), asked
per tenant; each action carries the session's CSRF token, and each action or refusal goes to the audit trail as the
gRPC calls' do (``audit_entry``, the same script)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from budgetwarden.domain import MAX_LIMIT_TOKENS, MAX_LIMIT_USD, Amount, Counter
from budgetwarden.limiter import Limiter, StoreUnavailableError, UnknownCheckpointError
from budgetwarden.store import CeilingRefusedError, TenantKeys, audit_record, live_tasks
from budgetwarden.transport import (
    LOCAL_CALLER,
    AccessFile,
    Identity,
    audit_entry,
    authorisation_refusal,
)

log = logging.getLogger("budgetwarden.console")

SESSION_COOKIE = "bw_console"
SESSION_SECONDS = 8 * 3600  # a working day; the token's revocation ends a session sooner
MAX_SESSIONS = 10_000  # past this many live sessions, the oldest is forgotten (its holder logs in again)
STORE_DEADLINE_S = 5.0
CHECKPOINTS_SHOWN = 100  # per tenant
DECISIONS_SHOWN = 30
LIVE_RESERVATIONS_READ = 200  # per tenant: the live tasks shown are those holding the first ones (by lease expiry)
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
TEMPLATES.env.filters["datetime"] = lambda ms: datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
# The pages load nothing from elsewhere and run no script; inline styles only (the bars' widths).
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",  # no-referrer would make a browser send Origin: null with a form
    "cache-control": "no-store",
}


@dataclass
class Session:
    token: str | None  # None: the console asks no credentials (no tokens file, loopback only)
    csrf: str
    expires_at: float
    notice: str = ""  # the outcome of the last action, shown once


@dataclass
class Sessions:
    """Sessions in the control plane's memory: a restart asks everyone to log in again."""

    clock: Callable[[], float] = time.monotonic
    _by_id: dict[str, Session] = field(default_factory=dict)

    def create(self, token: str | None) -> tuple[str, Session]:
        self._forget_expired()
        while len(self._by_id) >= MAX_SESSIONS:
            del self._by_id[next(iter(self._by_id))]  # the oldest: dicts keep insertion order
        session_id = secrets.token_urlsafe(32)
        session = Session(token, secrets.token_urlsafe(32), self.clock() + SESSION_SECONDS)
        self._by_id[session_id] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        session = self._by_id.get(session_id or "")
        if session is not None and session.expires_at <= self.clock():
            self.drop(session_id)
            return None
        return session

    def drop(self, session_id: str | None) -> None:
        self._by_id.pop(session_id or "", None)

    def _forget_expired(self) -> None:
        now = self.clock()
        for session_id in [sid for sid, s in self._by_id.items() if s.expires_at <= now]:
            del self._by_id[session_id]


@dataclass(frozen=True, kw_only=True)
class WindowUse:
    name: str
    limit_tokens: int | None
    spent_tokens: int  # used and reserved
    limit_usd: int | None
    spent_usd: int

    @property
    def tokens_percent(self) -> float | None:
        return _percent(self.spent_tokens, self.limit_tokens)

    @property
    def usd_percent(self) -> float | None:
        return _percent(self.spent_usd, self.limit_usd)


def _percent(spent: int, limit: int | None) -> float | None:
    if not limit:
        return None
    return min(100.0, 100.0 * spent / limit)


def _use(name: str, counter: Counter) -> WindowUse:
    return WindowUse(
        name=name,
        limit_tokens=counter.limit,
        spent_tokens=counter.used + counter.reserved,
        limit_usd=counter.limit_usd,
        spent_usd=counter.used_usd + counter.reserved_usd,
    )


class FormError(ValueError):
    """A form field that is not valid; the message starts with the field's name."""


def _usd_micros(text: str, name: str) -> int:
    try:
        value = Decimal(text.strip() or "0")
    except InvalidOperation:
        raise FormError(f"{name}: is not an amount in USD (got {text[:40]!r})") from None
    micros = value * 1_000_000
    if not value.is_finite() or micros != micros.to_integral_value() or not 0 <= micros <= MAX_LIMIT_USD:
        raise FormError(f"{name}: must be between 0 and {MAX_LIMIT_USD / 1_000_000} USD, to the micro-dollar")
    return int(micros)


def _tokens(text: str, name: str) -> int:
    stripped = text.strip() or "0"
    if not stripped.isdigit() or not 0 <= int(stripped) <= MAX_LIMIT_TOKENS:
        raise FormError(f"{name}: must be a whole number of tokens between 0 and {MAX_LIMIT_TOKENS}")
    return int(stripped)


def _field(form: FormData, name: str) -> str:
    value = form.get(name, "")
    return value if isinstance(value, str) else ""


class Console:
    def __init__(
        self, limiter: Limiter, access: AccessFile | None, *, secure_cookies: bool, sessions: Sessions | None = None
    ) -> None:
        self.limiter = limiter
        self.access = access
        self.secure_cookies = secure_cookies
        self.sessions = sessions or Sessions()

    # --- who is asking ------------------------------------------------------------------------------------------

    def _caller(self, request: Request) -> tuple[Session, Identity] | None:
        """The session's holder as the tokens file names them now (None: not logged in, or the token was revoked)."""
        session_id = request.cookies.get(SESSION_COOKIE)
        session = self.sessions.get(session_id)
        if session is None:
            return None
        if self.access is None:
            return session, LOCAL_CALLER
        identity = self.access.by_token(session.token or "")
        if identity is None:
            self.sessions.drop(session_id)
            return None
        return session, identity

    @staticmethod
    def _peer(request: Request) -> str:
        client = request.client
        return f"console {client.host}:{client.port}" if client else "console"

    def _with_cookie(self, response: Response, session_id: str) -> Response:
        response.set_cookie(
            SESSION_COOKIE,
            session_id,
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=self.secure_cookies,
        )
        return response

    async def refuse(
        self,
        request: Request,
        rpc: str,
        identity: Identity | None,
        tenant_id: str | None,
        asked: dict[str, Any],
        status: int,
        outcome: str,
        reason: str,
    ) -> Response:
        """Record the refusal in the audit trail as the admin API does, then answer it."""
        entry = audit_entry(self.limiter.clock(), rpc, identity, self._peer(request), tenant_id, asked)
        entry["reason"] = reason
        log.warning("console action refused", extra={"rpc": rpc, "who": entry["who"], "tenant_id": tenant_id or ""})
        self.limiter.telemetry.admin_call(rpc, outcome, "console")
        fields = {"entry": json.dumps(entry, separators=(",", ":")), "outcome": outcome}
        try:
            await self.limiter.record_refusal(tenant_id, fields, STORE_DEADLINE_S)
        except Exception as exc:  # the refusal is the answer whatever the store does
            log.error("cannot record a refused console action in the audit trail", extra={"error": repr(exc)})
        return TEMPLATES.TemplateResponse(request, "refused.html", {"reason": reason}, status_code=status)

    # --- pages --------------------------------------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        if self.access is None or self._caller(request) is not None:
            return RedirectResponse("/", status_code=303)
        return TEMPLATES.TemplateResponse(request, "login.html", {"error": ""})

    async def login(self, request: Request) -> Response:
        if self.access is None:
            return RedirectResponse("/", status_code=303)
        token = _field(await request.form(), "token").strip()
        if not token or self.access.by_token(token) is None:
            reason = "the bearer token is not known" if token else "a bearer token is required"
            await self.refuse(request, "ConsoleLogin", None, None, {}, 401, "UNAUTHENTICATED", reason)
            return TEMPLATES.TemplateResponse(request, "login.html", {"error": reason}, status_code=401)
        session_id, _ = self.sessions.create(token)
        return self._with_cookie(RedirectResponse("/", status_code=303), session_id)

    async def logout(self, request: Request) -> Response:
        caller = self._caller(request)
        if caller is not None and self._csrf_ok(caller[0], await request.form()):
            self.sessions.drop(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    async def overview(self, request: Request) -> Response:
        caller = self._caller(request)
        new_session = None
        if caller is None:
            if self.access is not None:
                return RedirectResponse("/login", status_code=303)
            new_session, session = self.sessions.create(None)
            caller = session, LOCAL_CALLER
        session, identity = caller
        tenants = self._visible_tenants(identity)
        context: dict[str, Any] = {
            "identity": identity,
            "csrf": session.csrf,
            "notice": session.notice,
            "logged_in": self.access is not None,
            "tenants": [],
            "checkpoints": [],
            "tasks": [],
            "decisions": [],
            "unavailable": "",
        }
        session.notice = ""
        try:
            context["tenants"] = [(t, await self._windows(t)) for t in tenants]
            context["checkpoints"] = await self._open_checkpoints(identity, tenants)
            async with _direct_read():
                context["tasks"] = await self._live_tasks(tenants)
                context["decisions"] = await self._recent_decisions(tenants)
        except StoreUnavailableError as exc:
            context["unavailable"] = f"the store does not answer: {exc}"
        response = TEMPLATES.TemplateResponse(request, "overview.html", context)
        return response if new_session is None else self._with_cookie(response, new_session)

    def _visible_tenants(self, identity: Identity) -> list[str]:
        """The tenants the caller may view: every tenant of the policy, or the ones their grant names."""
        named = identity.tenants if identity.tenants is not None else self.limiter.policy().policy.tenants.keys()
        return sorted(t for t in named if authorisation_refusal(identity, "GetTenantWindows", t) is None)

    async def _windows(self, tenant_id: str) -> list[WindowUse]:
        view = await self.limiter.budget(tenant_id, "", "", STORE_DEADLINE_S)
        return [_use(scope.name, counter) for scope, counter in view.scopes]

    async def _open_checkpoints(self, identity: Identity, tenants: list[str]) -> list[dict[str, Any]]:
        rows = []
        for tenant_id in tenants:
            if authorisation_refusal(identity, "ListCheckpoints", tenant_id) is not None:
                continue
            page = await self.limiter.list_checkpoints(
                tenant_id, decided=False, page_size=CHECKPOINTS_SHOWN, after=None, deadline_s=STORE_DEADLINE_S
            )
            may_decide = authorisation_refusal(identity, "ApproveCheckpoint", tenant_id) is None
            for record in page.checkpoints:
                task = record.task
                rows.append(
                    {
                        "record": record,
                        "may_decide": may_decide,
                        "task": None if task is None else _use(record.task_id, task),
                        "reserved": None if task is None else task.reserved,
                    }
                )
        return rows

    async def _live_tasks(self, tenants: list[str]) -> list[dict[str, Any]]:
        """The tasks holding a reservation now, with their spend (the tenants' lease indexes)."""
        rows = []
        for tenant_id in tenants:
            now = self.limiter.clock()
            for task in await live_tasks(self.limiter.store.redis, tenant_id, now, limit=LIVE_RESERVATIONS_READ):
                rows.append({"tenant_id": tenant_id, "task": task, "use": _use(task.task_id, task.counter)})
        return rows

    async def _recent_decisions(self, tenants: list[str]) -> list[dict[str, Any]]:
        """The latest entries of the tenants' audit trails: approvals, denials, ceilings, resets and refusals."""
        entries: list[tuple[tuple[int, int], dict[str, Any]]] = []
        redis = self.limiter.store.redis
        for tenant_id in tenants:
            for stream_id, raw in await redis.xrevrange(TenantKeys(tenant_id).audit, count=DECISIONS_SHOWN) or []:
                sid = _text(stream_id)
                fields = {_text(k): _text(v) for k, v in (raw or {}).items()}
                ms, _, seq = sid.partition("-")
                entries.append(((int(ms), int(seq or 0)), audit_record(sid, fields)))
        entries.sort(key=lambda pair: pair[0], reverse=True)
        return [record for _, record in entries[:DECISIONS_SHOWN]]

    # --- actions ------------------------------------------------------------------------------------------------

    @staticmethod
    def _csrf_ok(session: Session, form: FormData) -> bool:
        return hmac.compare_digest(_field(form, "csrf").encode(), session.csrf.encode())

    async def approve(self, request: Request) -> Response:
        return await self._decide(request, approve=True)

    async def deny(self, request: Request) -> Response:
        return await self._decide(request, approve=False)

    async def _decide(self, request: Request, *, approve: bool) -> Response:
        rpc = "ApproveCheckpoint" if approve else "DenyCheckpoint"
        form = await request.form()
        checkpoint = _field(form, "checkpoint_id")
        asked: dict[str, Any] = {"checkpoint_id": checkpoint[:256]}
        caller = self._caller(request)
        if caller is None:
            reason = "log in first: no session, or its token was revoked"
            return await self.refuse(request, rpc, None, None, asked, 401, "UNAUTHENTICATED", reason)
        session, identity = caller
        try:
            tenant_id, _ = self.limiter.checkpoint_owner(checkpoint)
        except UnknownCheckpointError:
            reason = "checkpoint_id: is not a checkpoint id issued by budgetwarden (ck1.…)"
            return TEMPLATES.TemplateResponse(request, "refused.html", {"reason": reason}, status_code=400)
        if not self._csrf_ok(session, form):
            reason = "the form's CSRF token is missing or is not this session's; reload the page"
            return await self.refuse(request, rpc, identity, tenant_id, asked, 403, "PERMISSION_DENIED", reason)
        try:
            add = Amount(
                _tokens(_field(form, "add_tokens"), "add_tokens"), _usd_micros(_field(form, "add_usd"), "add_usd")
            )
        except FormError as exc:
            return TEMPLATES.TemplateResponse(request, "refused.html", {"reason": str(exc)}, status_code=400)
        if approve:  # as the gRPC entries record a request: int64 as text, zero fields left out
            asked |= {
                name: str(value) for name, value in (("add_tokens", add.tokens), ("add_usd_micros", add.usd)) if value
            }
        else:
            add = Amount(0)
        refusal = authorisation_refusal(identity, rpc, tenant_id)
        if refusal is not None:
            return await self.refuse(request, rpc, identity, tenant_id, asked, 403, "PERMISSION_DENIED", refusal)
        entry = audit_entry(self.limiter.clock(), rpc, identity, self._peer(request), tenant_id, asked)
        try:
            outcome, _ = await self.limiter.decide_checkpoint(
                checkpoint,
                approve=approve,
                add=add,
                deadline_s=STORE_DEADLINE_S,
                audit=json.dumps(entry, separators=(",", ":")),
            )
        except CeilingRefusedError as exc:
            session.notice = f"{checkpoint}: refused, nothing was changed: {exc}"
            self.limiter.telemetry.admin_call(rpc, "FAILED_PRECONDITION", "console")
        except StoreUnavailableError as exc:
            session.notice = f"{checkpoint}: the store does not answer, try again: {exc}"
            self.limiter.telemetry.admin_call(rpc, "UNAVAILABLE", "console")
        else:
            session.notice = f"{checkpoint}: {_OUTCOMES.get(outcome, str(outcome))}"
            self.limiter.telemetry.admin_call(rpc, "OK", "console")
        return RedirectResponse("/", status_code=303)


_OUTCOMES = {1: "approved", 2: "already approved", 3: "denied", 4: "already denied", 5: "not found", 6: "conflict"}


@contextlib.asynccontextmanager
async def _direct_read() -> Any:
    """Reads of Redis outside the limiter, bounded and mapped as the limiter's are (StoreUnavailableError)."""
    try:
        async with asyncio.timeout(STORE_DEADLINE_S):
            yield
    except (redis.RedisError, OSError, TimeoutError) as exc:
        raise StoreUnavailableError(str(exc) or type(exc).__name__) from None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cross_origin(request: Request) -> str | None:
    """A form posted from another site's page (its Origin is not this console's), else None. Browsers send Origin
    with every POST; a client without one (curl) still needs the session and its CSRF token."""
    origin = request.headers.get("origin")
    if request.method != "POST" or origin is None:
        return None
    # Host to host: behind a proxy that terminates TLS the scheme differs, the host the browser asked for does not.
    own = request.headers.get("host", "")
    return None if hmac.compare_digest(urlsplit(origin).netloc.encode(), own.encode()) else origin


def _guarded(
    console: Console, app: Callable[[Request], Awaitable[Response]]
) -> Callable[[Request], Awaitable[Response]]:
    """Refuse a cross-origin form (login included: no one is logged in by another site), add the security headers."""

    async def handler(request: Request) -> Response:
        origin = _cross_origin(request)
        if origin is not None:
            reason = f"a form posted from another origin ({origin[:100]}) is refused"
            asked = {"path": request.url.path}
            response = await console.refuse(request, "ConsolePost", None, None, asked, 403, "PERMISSION_DENIED", reason)
        else:
            response = await app(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    return handler


def console_app(
    limiter: Limiter, access: AccessFile | None, *, secure_cookies: bool, sessions: Sessions | None = None
) -> Starlette:
    """The console as an ASGI application. ``access``: the admin tokens file (None: no login, loopback only)."""
    console = Console(limiter, access, secure_cookies=secure_cookies, sessions=sessions)
    routes = [
        Route("/", _guarded(console, console.overview), methods=["GET"]),
        Route("/login", _guarded(console, console.login_page), methods=["GET"]),
        Route("/login", _guarded(console, console.login), methods=["POST"]),
        Route("/logout", _guarded(console, console.logout), methods=["POST"]),
        Route("/checkpoints/approve", _guarded(console, console.approve), methods=["POST"]),
        Route("/checkpoints/deny", _guarded(console, console.deny), methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.console = console
    return app
