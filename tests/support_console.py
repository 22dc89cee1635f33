"""The console's tests: a control plane serving the console from its own thread and event loop against the test's
Valkey, on the sidecar's clock, and a browser-less client that logs in and reads the CSRF token from the page."""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path
from typing import Any

import httpx

from budgetwarden.app import ControlPlane
from budgetwarden.limiter import Clock

from support import RunningSidecar, free_port, sidecar_settings
from support_admin import TWO_TENANTS_POLICY, TokensFile

START_LIMIT_S = 60


class RunningControlPlane:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> RunningControlPlane:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.plane.start(), self._loop).result(START_LIMIT_S)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def console_url(self) -> str:
        console = self.plane.console
        assert console is not None, "the control plane serves no console"
        return f"{console.scheme}://127.0.0.1:{console.port}"

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.plane.stop(), self._loop).result(START_LIMIT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def two_tenants(tmp_path: Path) -> Path:
    policy = tmp_path / "policy.yaml"
    policy.write_text(TWO_TENANTS_POLICY)
    return policy


def start_control_plane(
    redis_url: str, tokens: TokensFile | None, policy: Path, clock: Clock, **overrides: Any
) -> RunningControlPlane:
    values: dict[str, Any] = {
        "admin_listen": f"127.0.0.1:{free_port()}",
        "console_listen": f"127.0.0.1:{free_port()}",
        "policy_file": policy,
    }
    if tokens is not None:
        values["admin_tokens_file"] = tokens.path
    settings = sidecar_settings(redis_url, **(values | overrides))
    return RunningControlPlane(ControlPlane(settings, clock=clock)).start()


CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(page: str) -> str:
    found = CSRF.search(page)
    assert found, f"no CSRF token in the page:\n{page[:2000]}"
    return found.group(1)


def logged_in(url: str, token: str, **client: Any) -> tuple[httpx.Client, str]:
    """A client with a session of ``token``, and the overview page it sees."""
    browser = httpx.Client(base_url=url, timeout=30, **client)
    answer = browser.post("/login", data={"token": token}, follow_redirects=True)
    assert answer.status_code == 200, answer.text
    assert answer.url.path == "/", answer.url
    return browser, answer.text


def same_clock(sidecar: RunningSidecar) -> Clock:
    return sidecar.clock
