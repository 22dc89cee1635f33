"""A real Redis Cluster for tests: Valkey nodes (the embedded server's binary) with ``--cluster-enabled``, the slots
split evenly over the primaries, optional replicas, and for failovers a short ``cluster-node-timeout`` so a killed
primary's replica is promoted within seconds."""

from __future__ import annotations

import random
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import redis
from redis.crc import key_slot

from budgetwarden.store._embedded import server_binary

from support import wait_until

SLOTS = 16384
# A primary silent this long is failing to the others, and its replica then asks to be promoted. Valkey's default
# (15 s) for clusters without a failover to wait for, where a busy machine must not make a node look failed.
DEFAULT_NODE_TIMEOUT_MS = 15_000
FAILOVER_NODE_TIMEOUT_MS = 1000


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(count: int) -> list[int]:
    """Ports whose cluster-bus port (port + 10000) is free as well."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 29999)
        if port not in ports and _free(port) and _free(port + 10000):
            ports.append(port)
    return ports


def slot_owner(key: str, primaries: int) -> int:
    """The index of the primary that owns ``key``'s slot in a cluster formed by ``Cluster`` (even slot ranges)."""
    return min(key_slot(key.encode()) // (SLOTS // primaries), primaries - 1)


class ClusterNode:
    def __init__(self, folder: Path, port: int, node_timeout_ms: int, extra: Sequence[str] = ()) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.folder = folder
        args = [
            str(server_binary()),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            "--dir", str(folder),
            "--logfile", str(folder / "node.log"),
            "--save", "",
            "--appendonly", "no",
            *extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10, decode_responses=True)

    def node_id(self) -> str:
        with self.client() as client:
            return str(client.execute_command("CLUSTER", "MYID"))

    def role(self) -> str:
        with self.client() as client:
            return str(client.info("replication")["role"])

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """As a crashed host: no shutdown, nothing flushed."""
        if self.alive():
            self.process.kill()
            self.process.wait(30)

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Cluster:
    """``primaries`` nodes owning the slots in even ranges; ``replicated`` names the primaries (by index) that get a
    replica, once per replica. ``replicas_of[i]`` are primary i's replicas, ``replica_of[i]`` the first of them."""

    def __init__(
        self,
        folder: Path,
        primaries: int = 3,
        replicated: Sequence[int] = (),
        node_timeout_ms: int = DEFAULT_NODE_TIMEOUT_MS,
        extra: Sequence[str] = (),
    ) -> None:
        """``extra``: more arguments for every node's server."""
        ports = cluster_ports(primaries + len(replicated))
        self.primaries: list[ClusterNode] = []
        self.replicas_of: dict[int, list[ClusterNode]] = {}
        try:
            for n, port in enumerate(ports[:primaries]):
                self.primaries.append(ClusterNode(folder / f"primary-{n}", port, node_timeout_ms, extra))
            for n, port in zip(replicated, ports[primaries:], strict=True):
                replicas = self.replicas_of.setdefault(n, [])
                replicas.append(ClusterNode(folder / f"replica-{n}-{len(replicas)}", port, node_timeout_ms, extra))
            self._form()
        except BaseException:
            self.stop()
            raise

    @property
    def replica_of(self) -> dict[int, ClusterNode]:
        return {n: replicas[0] for n, replicas in self.replicas_of.items()}

    @property
    def all_replicas(self) -> list[ClusterNode]:
        return [replica for replicas in self.replicas_of.values() for replica in replicas]

    @property
    def nodes(self) -> list[ClusterNode]:
        return [*self.primaries, *self.all_replicas]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.primaries[0].port}/0"

    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{node.port}/0" for node in self.nodes]

    def _form(self) -> None:
        for node in self.nodes:
            wait_until(lambda node=node: bool(node.client().ping()), f"node {node.port} answers")
        share = SLOTS // len(self.primaries)
        for i, node in enumerate(self.primaries):
            last = SLOTS - 1 if i == len(self.primaries) - 1 else (i + 1) * share - 1
            with node.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
        first = self.primaries[0]
        for node in self.nodes[1:]:
            with node.client() as client:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", first.port)
        wait_until(self._everyone_knows_everyone, "every node knows every other")
        for n, replicas in self.replicas_of.items():
            primary_id = self.primaries[n].node_id()
            for replica in replicas:
                with replica.client() as client:
                    client.execute_command("CLUSTER", "REPLICATE", primary_id)
        for replica in self.all_replicas:
            wait_until(lambda replica=replica: self._in_sync(replica), f"replica {replica.port} is in sync")
        wait_until(self.healthy, "the cluster state is ok on every node")

    def _everyone_knows_everyone(self) -> bool:
        for node in self.nodes:
            with node.client() as client:
                known = client.execute_command("CLUSTER", "NODES")
            if len(str(known).strip().splitlines()) < len(self.nodes):
                return False
        return True

    @staticmethod
    def _in_sync(replica: ClusterNode) -> bool:
        with replica.client() as client:
            return bool(client.info("replication").get("master_link_status") == "up")

    def healthy(self) -> bool:
        for node in self.nodes:
            if not node.alive():
                continue
            with node.client() as client:
                if "cluster_state:ok" not in str(client.execute_command("CLUSTER", "INFO")):
                    return False
        return True

    def cut_replication(self, n: int) -> None:
        """Primary ``n`` drops its replica and refuses it again (its PSYNC gets NOPERM), so writes from now on stay on
        the primary alone: what a broken link does, made certain."""
        with self.primaries[n].client() as primary:
            primary.acl_setuser("default", enabled=True, commands=["-psync", "-sync"], reset=False)
            primary.client_kill_filter(_type="replica")
        replica = self.replica_of[n]
        wait_until(lambda: not self._in_sync(replica), f"the link to replica {replica.port} is down")

    def restore_replication(self, n: int) -> None:
        with self.primaries[n].client() as primary:
            primary.acl_setuser("default", enabled=True, commands=["+psync", "+sync"], reset=False)
        replica = self.replica_of[n]
        wait_until(lambda: self._in_sync(replica), f"replica {replica.port} is in sync again")

    def fail_over_by_killing(self, n: int) -> ClusterNode:
        """Kill primary ``n`` and wait until one of its replicas is promoted and the cluster serves every slot again;
        the promoted replica is returned."""
        self.primaries[n].kill()
        return self.wait_for_promotion(n)

    def wait_for_promotion(self, n: int) -> ClusterNode:
        promoted: list[ClusterNode] = []

        def one_is_promoted() -> bool:
            promoted[:] = [replica for replica in self.replicas_of[n] if replica.role() == "master"]
            return bool(promoted)

        wait_until(one_is_promoted, f"a replica of primary {n} is promoted")
        wait_until(self.healthy, "the cluster state is ok again")
        return promoted[0]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
