"""A real multi-node Ray cluster on this machine: one `ray start` per network namespace
(`netns.Network`), each node with its own address, its own temp dir and 1 CPU, so that 2
training workers must land on 2 nodes. The dashboard (job submission) listens on the head
node's address; this machine reaches it over the bridge, as a laptop reaches a cluster.
The nodes share the file system: it plays the NFS mount a real cluster's run directory needs."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .netns import Network, stop_processes

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
GCS_PORT, DASHBOARD_PORT = 6379, 8265
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what single-node runs here set, to keep Ray on
# 127.0.0.1) also refuses a second node: these nodes need it on
NODE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
            # the nodes' `python` and `ddetr` are this checkout's venv, as a cluster image's would be
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}


class RayCluster:
    def __init__(self, net: Network, workdir: Path):
        self.net, self.workdir = net, workdir
        self.head = net.nodes[0]
        self.gcs_address = f"{self.head.address}:{GCS_PORT}"
        self.dashboard_url = f"http://{self.head.address}:{DASHBOARD_PORT}"
        # Ray >= 2.52 guards a cluster on a routable address with a token that every node and
        # client must present: this cluster's own, not whatever ~/.ray/auth_token holds
        self.token = secrets.token_hex(16)
        self.env = {**os.environ, **NODE_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    # what each node's processes (the job's driver, Ray Train's helpers) join: this
                    # cluster, not another Ray that runs on the machine
                    "RAY_ADDRESS": self.gcs_address}
        self.processes: list[subprocess.Popen] = []
        # short: Ray's unix socket paths live under it and must stay under 107 characters
        self.temp_root = Path(tempfile.mkdtemp(prefix="ddr-", dir="/tmp"))

    def start(self, timeout: float = 120) -> "RayCluster":
        for i, node in enumerate(self.net.nodes):
            common = ["--node-ip-address", node.address, "--num-cpus", "1", "--object-store-memory", str(100 << 20),
                      "--temp-dir", str(self.temp_root / f"n{i}"), "--disable-usage-stats", "--block"]
            role = (["--head", "--port", str(GCS_PORT), "--dashboard-host", node.address, "--dashboard-port",
                     str(DASHBOARD_PORT), "--include-dashboard", "true"] if i == 0 else
                    ["--address", self.gcs_address])
            log = (self.workdir / f"ray-node{i}.log").open("w")
            self.processes.append(self.net.popen(i, [RAY, "start", *role, *common], env=self.env, stdout=log,
                                                 stderr=subprocess.STDOUT))
            if i == 0:
                self._wait(lambda: self._alive_nodes() >= 1, timeout, "the head node")
        self._wait(lambda: self._alive_nodes() == len(self.net.nodes), timeout,
                   f"{len(self.net.nodes)} nodes to join")
        return self

    def _alive_nodes(self) -> int:
        request = urllib.request.Request(f"{self.dashboard_url}/nodes?view=summary",
                                         headers={"authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                summary = json.load(response)["data"]["summary"]
        except (OSError, ValueError, KeyError):
            return 0
        return sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            dead = [i for i, p in enumerate(self.processes) if p.poll() is not None]
            if dead:
                raise RuntimeError(f"ray node {dead[0]} exited: {(self.workdir / f'ray-node{dead[0]}.log').read_text()[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}")

    def ray(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """A `ray` CLI command run from this machine (outside the cluster), as a user runs it."""
        return subprocess.run([RAY, *args], env={**self.env, "RAY_ADDRESS": self.dashboard_url},
                              capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        # not `ray stop`: it finds Ray processes by name, machine-wide (namespaces share process
        # ids), and would end other Rays on this machine. SIGTERM makes `ray start --block` stop
        # its own node; Network.remove() kills whatever is still inside a namespace.
        stop_processes(self.processes, timeout=30)
        shutil.rmtree(self.temp_root, ignore_errors=True)
