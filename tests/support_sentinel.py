"""A real Redis Sentinel deployment for tests: a Valkey primary, one replica and three sentinels (the same Valkey
binary run with --sentinel), on free loopback ports, with the failover timings shortened."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import redis

from budgetwarden.store._embedded import server_binary

from support import free_port, wait_until

SERVICE = "budget-master"
QUORUM = 2
DOWN_AFTER_MS = 1000  # a primary silent this long is down to a sentinel


class Node:
    def __init__(self, folder: Path, name: str, extra: list[str]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.folder = folder
        self.log = folder / f"{name}.log"
        args = [
            str(server_binary()),
            *extra,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(folder),
            "--logfile", str(self.log),
            "--daemonize", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10, decode_responses=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """As a crashed host: no shutdown, nothing flushed."""
        if self.alive():
            self.process.kill()
            self.process.wait(30)

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.alive():
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class SentinelGroup:
    def __init__(self, folder: Path, replicas: int = 1) -> None:
        data = ["--save", "", "--appendonly", "no"]
        self.primary = Node(folder / "primary", "primary", data)
        self.replicas = [Node(folder / f"replica-{n}", "replica", data) for n in range(replicas)]
        self.replica = self.replicas[0]
        self.sentinels: list[Node] = []
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        # The replicas are started before the primary's port is known to them: point them there now.
        for replica in self.replicas:
            wait_until(lambda replica=replica: bool(replica.client().ping()), "the replica answers")
            replica.client().replicaof("127.0.0.1", self.primary.port)
        wait_until(self._replica_in_sync, "the replicas are in sync with the primary")
        for n in range(3):
            folder = self.primary.folder.parent / f"sentinel-{n}"
            folder.mkdir()
            config = folder / "sentinel.conf"  # sentinels rewrite their config: one file each
            config.write_text(
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} {QUORUM}\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.sentinels.append(Node(folder, "sentinel", [str(config), "--sentinel"]))
        wait_until(self._sentinels_see_everyone, "every sentinel knows the replica and the other sentinels")

    def _replica_in_sync(self) -> bool:
        infos = [replica.client().info("replication") for replica in self.replicas]
        return all(info.get("master_link_status") == "up" for info in infos)

    def _sentinels_see_everyone(self) -> bool:
        for sentinel in self.sentinels:
            client = sentinel.client()
            if len(client.sentinel_slaves(SERVICE)) < len(self.replicas) or len(client.sentinel_sentinels(SERVICE)) < 2:
                return False
        return True

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def master_port(self) -> int:
        _host, port = self.sentinels[0].client().sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def cut_replication(self) -> None:
        """The primary drops its replica and refuses it again (its PSYNC gets NOPERM), so writes from now on stay on
        the primary alone: what a broken link does, made certain (pausing the replica is not: its kernel still
        receives the stream, and it catches up the moment it runs)."""
        primary = self.primary.client()
        primary.acl_setuser("default", enabled=True, commands=["-psync", "-sync"], reset=False)
        primary.client_kill_filter(_type="replica")
        wait_until(
            lambda: self.replica.client().info("replication")["master_link_status"] == "down", "the link is down"
        )

    def restore_replication(self) -> None:
        self.primary.client().acl_setuser("default", enabled=True, commands=["+psync", "+sync"], reset=False)
        wait_until(self._replica_in_sync, "the replica is in sync again")

    def fail_over_by_killing_the_primary(self) -> None:
        self.primary.kill()
        wait_until(lambda: self.master_port() == self.replica.port, "the sentinels promote the replica")
        wait_until(
            lambda: self.replica.client().info("replication")["role"] == "master", "the replica becomes the master"
        )

    def stop(self) -> None:
        for node in [*self.sentinels, *self.replicas, self.primary]:
            node.stop()
