"""Servers the cluster tests start on loopback and stop by PID: a Ray cluster of several raylets on this
machine (each `ray start` is one node), an MLflow tracking server, and an S3-compatible server (moto)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.conftest import free_port, without_ray_address

VENV_BIN = Path(sys.executable).parent
# Ports every raylet needs for itself; two raylets on one machine must not share any.
NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "runtime-env-agent-port")
OBJECT_STORE_BYTES = 300_000_000
# Each node's worker processes listen on a block of ports of its own, below Linux's ephemeral range (where
# free_port() finds the other ports) and above Ray's default block (10002-19999, the tests' other Ray).
FIRST_WORKER_PORT, WORKER_PORTS_PER_NODE = 21000, 500


def wait_until(condition, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def auth_env(home: Path) -> dict:
    """What a client of a token-authenticated Ray needs, and nothing of the tests' own Ray or MLflow."""
    env = without_ray_address() | {"HOME": str(home), "RAY_AUTH_MODE": "token",
                                   "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@dataclass
class LocalCluster:
    """Raylets on 127.0.0.1 sharing one --temp-dir, so that every process of theirs can be found."""

    env: dict
    temp_dir: str
    gcs_port: int
    dashboard_port: int
    node_manager_ports: dict[str, int] = field(default_factory=dict)
    nodes_started: int = 0

    @classmethod
    def start(cls, home: Path, cpus_per_node: int = 1) -> LocalCluster:
        env = auth_env(home)
        subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
        cluster = cls(env, tempfile.mkdtemp(prefix="raytest", dir="/tmp"), free_port(), free_port())
        cluster._start_node("head", cpus_per_node, ["--head", f"--port={cluster.gcs_port}", "--dashboard-host=127.0.0.1",
                                                    f"--dashboard-port={cluster.dashboard_port}"])
        return cluster

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add_node(self, name: str, cpus: int = 1) -> None:
        self._start_node(name, cpus, [f"--address={self.address}"])

    def _start_node(self, name: str, cpus: int, role: list[str]) -> None:
        ports = {option: free_port() for option in NODE_PORTS}
        worker_ports = FIRST_WORKER_PORT + self.nodes_started * WORKER_PORTS_PER_NODE
        self.nodes_started += 1
        started = subprocess.run(
            ["ray", "start", *role, "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", f"--temp-dir={self.temp_dir}",
             f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats",
             f"--min-worker-port={worker_ports}", f"--max-worker-port={worker_ports + WORKER_PORTS_PER_NODE - 1}",
             *(f"--{option}={port}" for option, port in ports.items())],
            env=self.env, capture_output=True, text=True, timeout=180,
        )
        assert started.returncode == 0, f"ray start ({name}) failed:\n{started.stdout}\n{started.stderr}"
        self.node_manager_ports[name] = ports["node-manager-port"]
        wait_until(lambda: self.alive_nodes() == len(self.node_manager_ports), 120, f"node {name} to join")

    def alive_nodes(self) -> int:
        status = subprocess.run(["ray", "list", "nodes", "--address", self.dashboard, "--filter", "state=ALIVE",
                                 "--format", "json"], env=self.env, capture_output=True, text=True, timeout=60)
        return len(json.loads(status.stdout)) if status.returncode == 0 else -1

    def kill_node(self, name: str) -> None:
        """SIGKILL of a node's raylet and everything it started, as when the machine dies."""
        port = self.node_manager_ports.pop(name)
        raylet = next(process for process in psutil.process_iter(["cmdline"])
                      if f"--node_manager_port={port}" in " ".join(process.info["cmdline"] or []))
        for process in [*raylet.children(recursive=True), raylet]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        for process in psutil.process_iter(["cmdline"]):
            if self.temp_dir in " ".join(process.info["cmdline"] or []):
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass


@dataclass
class Server:
    """A server process in a session of its own, stopped with its whole process group."""

    process: subprocess.Popen
    url: str

    @classmethod
    def start(cls, command: list[str], url: str, probe: str, env: dict, log: Path, timeout: float = 120) -> Server:
        process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        server = cls(process, url)

        def answers() -> bool:
            assert process.poll() is None, f"{command[0]} exited:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"{url}{probe}", timeout=5):
                    return True
            except OSError:
                return False

        wait_until(answers, timeout, f"{' '.join(command[:3])} to answer")
        return server

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


def mlflow_server(folder: Path, env: dict, basic_auth: bool = False) -> Server:
    """basic_auth: the README's team server, on loopback (env carries its secret key, the admin's
    password and MLFLOW_AUTH_CONFIG_PATH)."""
    port = free_port()
    command = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    if basic_auth:
        command += ["--app-name", "basic-auth", "--allowed-hosts", f"127.0.0.1:{port}"]
    return Server.start(command, f"http://127.0.0.1:{port}", "/health", env, folder / "mlflow-server.log")


def s3_server(folder: Path, env: dict) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return Server.start(command, f"http://127.0.0.1:{port}", "/moto-api/", env, folder / "moto.log")
