"""The lean client (store/_lean.py) is the default for checks' script calls on a single Redis; the setting turns it
off, and redis-py takes the calls again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from budgetwarden.app._config import Settings
from budgetwarden.store import LeanScripts

from support import RunningSidecar


def test_checks_go_through_the_lean_client_by_default() -> None:
    assert Settings().lean_redis_client is True


def test_a_default_sidecar_on_one_redis_runs_its_checks_on_the_lean_client(
    start_sidecar: Callable[..., RunningSidecar],
) -> None:
    running = start_sidecar()
    assert running.sidecar is not None
    assert running.sidecar.limiter is not None
    assert isinstance(running.sidecar.limiter.store.lean, LeanScripts)


def test_the_setting_turns_it_off(start_sidecar: Callable[..., RunningSidecar]) -> None:
    overrides: dict[str, Any] = {"lean_redis_client": False}
    running = start_sidecar(**overrides)
    assert running.sidecar is not None
    assert running.sidecar.limiter is not None
    assert running.sidecar.limiter.store.lean is None
