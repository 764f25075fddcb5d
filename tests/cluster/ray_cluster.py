"""A real multi-node Ray cluster on this machine, made like a cloud one: one `ray start` per
network namespace (`netns.Network`), each node with its own address and host name (the
workers join the head by name), its own file system (`private_fs`: a private /tmp and no
checkout of this repository; only the shared directory, the NFS mount of a real cluster,
and the Python environment, a real node's image, are common), and token authentication on.
The head offers no CPU (a CPU head: the driver, the dashboard, no training worker); each
worker node 1 CPU, so 2 training workers land on 2 nodes. Clients (`ray job submit`) run
on this machine, outside the cluster, set up as docs/clusters.md tells a user: the cluster's
token in ~/.ray/auth_token (`client_env`)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .netns import Network, stop_processes
from .private_fs import node_command

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
RAY = str(VENV / "bin" / "ray")
GCS_PORT, DASHBOARD_PORT = 6379, 8265
NODE_CPUS = (0, 1, 1)  # head, workers
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what single-node runs here set, to keep Ray on
# 127.0.0.1) also refuses a second node: these nodes need it on
NODE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
            # the nodes' `python` and `ray` are this venv (their image's), without our package
            "PATH": f"{VENV / 'bin'}:{os.environ.get('PATH', '')}"}
NOT_FOR_NODES = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "PYTHONPATH")


def extensions_root() -> Path:
    from ddetr_dist.ops.build import extensions_root as root

    return root()


class RayCluster:
    def __init__(self, net: Network, workdir: Path, shared: Path):
        if len(net.nodes) != len(NODE_CPUS):
            raise ValueError(f"a RayCluster has {len(NODE_CPUS)} nodes (head + workers)")
        self.net, self.workdir, self.shared = net, workdir, shared
        self.head = net.nodes[0]
        self.dashboard_url = f"http://{self.head.address}:{DASHBOARD_PORT}"
        # Ray >= 2.52 guards a cluster on a routable address with a token that every node and
        # client must present: this cluster's own, not whatever ~/.ray/auth_token holds
        self.token = secrets.token_hex(16)
        # this machine's environment without any Ray cluster's address or auth settings
        self.base_env = {k: v for k, v in os.environ.items() if k not in NOT_FOR_NODES}
        # what a node's image and start command set: the mode and the token, and the head by
        # name (for the job drivers and Ray Train's helpers that run there)
        self.node_env = {**self.base_env, **NODE_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                         "RAY_ADDRESS": f"{self.head.name}:{GCS_PORT}"}
        self.client_home = workdir / "client-home"
        self.processes: list[subprocess.Popen] = []

    def client_env(self, **extra: str) -> dict:
        """A user's shell on their own machine, set up as docs/clusters.md says: the token in
        ~/.ray/auth_token, RAY_ADDRESS the job server; nothing else of the cluster's."""
        (self.client_home / ".ray").mkdir(parents=True, exist_ok=True)
        (self.client_home / ".ray" / "auth_token").write_text(self.token + "\n")
        # and `ray` on PATH: this venv, activated
        return {**self.base_env, "HOME": str(self.client_home), "RAY_ADDRESS": self.dashboard_url,
                "PATH": f"{VENV / 'bin'}:{os.environ.get('PATH', '')}", **extra}

    def node_argv(self, index: int, argv: list[str]) -> list[str]:
        """`argv` as node `index` runs it: its host name, its own /tmp, no checkout."""
        stage = Path("/run") / f"{self.net.prefix}-stage{index}"
        stage.mkdir(parents=True, exist_ok=True)
        hide = [Path("/tmp"), REPO]
        share = [p for p in (self.shared, VENV, extensions_root())
                 if any(p.is_relative_to(h) for h in hide)]
        for path in share:  # a bind mount needs its source (the op's cache may not be made yet)
            path.mkdir(parents=True, exist_ok=True)
        return node_command(self.net.nodes[index].name, hide, share, stage, argv)

    def start(self, timeout: float = 120) -> "RayCluster":
        for i in range(len(self.net.nodes)):
            self.start_node(i)
            if i == 0:
                self._wait(lambda: self._alive_nodes() >= 1, timeout, "the head node")
        self._wait(lambda: self._alive_nodes() == len(self.net.nodes), timeout,
                   f"{len(self.net.nodes)} nodes to join")
        return self

    def start_node(self, i: int) -> None:
        """Node `i`'s `ray start`; again after `lose_node(i)` (a replacement machine joining
        under the same name and address; its Ray is a new node to the head)."""
        # the temp dir is in the node's own /tmp: short (Ray's socket paths < 107 characters)
        common = ["--num-cpus", str(NODE_CPUS[i]), "--object-store-memory", str(100 << 20), "--temp-dir", "/tmp/ray",
                  "--disable-usage-stats", "--block"]
        role = (["--head", "--port", str(GCS_PORT), "--dashboard-host", "0.0.0.0", "--dashboard-port",
                 str(DASHBOARD_PORT), "--include-dashboard", "true"] if i == 0 else
                ["--address", f"{self.head.name}:{GCS_PORT}"])
        log = (self.workdir / f"ray-node{i}.log").open("a")
        process = self.net.popen(i, self.node_argv(i, [RAY, "start", *role, *common]), env=self.node_env,
                                 stdout=log, stderr=subprocess.STDOUT)
        if i < len(self.processes):
            self.processes[i] = process
        else:
            self.processes.append(process)

    def lose_node(self, i: int, timeout: float = 60) -> None:
        """Node `i` dies as a machine does (power, kernel panic, a reclaimed spot VM): every
        process in it is killed at once, none says goodbye to the head, which finds out by
        its health checks. `start_node(i)` brings a replacement."""
        pids = subprocess.run(["ip", "netns", "pids", self.net.nodes[i].namespace], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        self.processes[i].wait(timeout=timeout)

    def on_node(self, index: int, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        """A command run on node `index`, in its namespaces (network, host name, file system:
        its /tmp is the one its Ray uses). `ray start --block` is the process we started:
        `ip netns exec`, `unshare` and the setup shell each exec into the next."""
        node = ["nsenter", "-t", str(self.processes[index].pid), "-m", "-u", "-n", "--"]
        return subprocess.run(node + argv, env=self.node_env, capture_output=True, text=True, timeout=timeout)

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
        """A `ray` CLI command run from the user's machine, as docs/clusters.md's client setup has it
        (`export RAY_AUTH_MODE=token` for the `ray job` commands)."""
        return subprocess.run([RAY, *args], env=self.client_env(RAY_AUTH_MODE="token"), capture_output=True,
                              text=True, timeout=timeout)

    def stop(self) -> None:
        # not `ray stop`: it finds Ray processes by name, machine-wide (namespaces share process
        # ids), and would end other Rays on this machine. SIGTERM makes `ray start --block` stop
        # its own node; Network.remove() kills whatever is still inside a namespace.
        stop_processes(self.processes, timeout=30)
        for i in range(len(self.net.nodes)):
            shutil.rmtree(Path("/run") / f"{self.net.prefix}-stage{i}", ignore_errors=True)
