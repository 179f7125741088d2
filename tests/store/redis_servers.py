"""Real Redis servers for the tests: one server, or a 3-master cluster plus one replica, on free loopback
ports in temporary directories, stopped by their process ids.

Without ``redis-server`` the tests that need it skip with how to install it, except in CI
(``CI=true``), where they fail.
"""
from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

HOST = "127.0.0.1"   # loopback only
START_TIMEOUT_S = 15.0


def require_redis() -> None:
    if shutil.which("redis-server") and shutil.which("redis-cli"):
        return
    msg = "redis-server not found: install the Debian package (apt-get install -y redis-server)"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def free_port(cluster: bool = False) -> int:
    """A free loopback port; for a cluster node also its bus port (port + 10000), so below 55536."""
    if not cluster:
        with socket.socket() as s:
            s.bind((HOST, 0))
            return s.getsockname()[1]
    for _ in range(200):
        port = random.randrange(20000, 45000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind((HOST, p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of loopback ports for a cluster node")


def cli(port: int, *args: str, timeout: float = 10.0) -> str:
    out = subprocess.run(["redis-cli", "-h", HOST, "-p", str(port), *args], capture_output=True, text=True,
                         timeout=timeout)
    return out.stdout.strip()


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port`` with its files in ``root``."""

    def __init__(self, root: Path, *args: str, port: int | None = None):
        self.port = port or free_port()
        self.root = root / f"redis-{self.port}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.args = ["redis-server", "--port", str(self.port), "--bind", HOST, "--dir", str(self.root),
                     "--save", "", "--appendonly", "no", "--logfile", "server.log", *args]
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    reply = s.recv(64)
                    if reply.startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not start in {START_TIMEOUT_S} s")

    def stop(self) -> None:
        """Kill the server by its pid (SIGKILL: a crash, not a shutdown) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


class RedisCluster:
    """Three masters built with ``redis-cli --cluster create`` and one replica of the first master
    (``replica=False``: none; ``full_coverage=False``: ``cluster-require-full-coverage no``, so the live
    masters keep serving their slots while another is dead)."""

    def __init__(self, root: Path, replica: bool = True, full_coverage: bool = True):
        opts = ("--cluster-enabled", "yes", "--cluster-node-timeout", "1000", "--cluster-config-file", "nodes.conf",
                "--cluster-require-full-coverage", "yes" if full_coverage else "no")
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(4 if replica else 3):
                self.nodes.append(RedisServer(root, *opts, port=free_port(cluster=True)))
            self._build()
        except BaseException:
            self.stop()
            raise

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(n.url for n in self.nodes[:3])

    def _build(self) -> None:
        masters = [f"{HOST}:{n.port}" for n in self.nodes[:3]]
        subprocess.run(["redis-cli", "--cluster", "create", *masters, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        if len(self.nodes) == 3:
            self.wait(lambda: all("cluster_state:ok" in cli(n.port, "cluster", "info") for n in self.nodes))
            return
        first = self.nodes[0]
        master_id = cli(first.port, "cluster", "myid")
        subprocess.run(["redis-cli", "--cluster", "add-node", f"{HOST}:{self.nodes[3].port}", masters[0],
                        "--cluster-slave", "--cluster-master-id", master_id],
                       check=True, capture_output=True, timeout=60)
        self.wait(lambda: all("cluster_state:ok" in cli(n.port, "cluster", "info") for n in self.nodes)
                  and "master_link_status:up" in cli(self.nodes[3].port, "info", "replication"))

    @staticmethod
    def wait(cond, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError("cluster did not reach the expected state")
            time.sleep(0.1)

    def master_of(self, key: str) -> RedisServer:
        slot = int(cli(self.nodes[0].port, "cluster", "keyslot", key))
        for line in cli(self.nodes[0].port, "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2]:
                for r in fields[8:]:
                    lo, _, hi = r.partition("-")
                    if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                        return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no master serves slot {slot}")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
