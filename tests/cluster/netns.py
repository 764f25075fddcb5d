"""Machines for cluster tests, made on this one: Linux network namespaces, each with its own
address on a private bridge and its own host name that every node resolves through its
hosts file, as close to separate nodes as one machine gets (they share the file system,
as nodes share an NFS mount, unless a caller gives a node a private one: `private_fs.py`).
Needs root and `ip`; `available()` says why not otherwise.

    with Network("ddr", 2) as net:          # namespaces ddr0, ddr1; bridge ddr-br
        net.nodes[0].address                 # '10.213.7.2'
        net.nodes[0].name                    # 'ddr-node0', in every node's /etc/hosts
        net.popen(0, ["ray", "start", ...])  # a process inside node 0
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path


def available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    probe = "ddprobe%d" % os.getpid()
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


def stop_processes(processes, timeout: float) -> None:
    """SIGTERM each process still running, all at once; SIGKILL those not gone `timeout`
    seconds later."""
    live = [p for p in processes if p.poll() is None]
    for p in live:
        p.terminate()
    for p in live:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@dataclass
class Node:
    namespace: str
    address: str
    name: str  # its host name: what the other nodes' hosts files map to `address`


class Network:
    """`count` namespaces `<prefix>0..` on the bridge `<prefix>-br`, subnet 10.213.X.0/24
    (X from the prefix, so two networks with different prefixes coexist). This machine
    (the root namespace) is 10.213.X.1 on the bridge and can reach every node.

    `loopback_names`: each node's own name resolves, on that node, to 127.0.1.1 (what
    Debian and Ubuntu write into /etc/hosts at install), as on clusters whose nodes find
    each other through DNS; the other nodes' names still resolve to their addresses."""

    def __init__(self, prefix: str, count: int, loopback_names: bool = False):
        if len(prefix) > 8:
            raise ValueError("prefix: at most 8 characters (interface names are short)")
        self.prefix, self.count = prefix, count
        self.subnet = 10 + zlib.crc32(prefix.encode()) % 240
        self.bridge = f"{prefix}-br"
        self.host_address = f"10.213.{self.subnet}.1"
        self.nodes = [Node(f"{prefix}{i}", f"10.213.{self.subnet}.{i + 2}", f"{prefix}-node{i}") for i in range(count)]
        self.loopback_names = loopback_names

    def hosts_file(self, node: Node) -> str:
        """`node`'s /etc/hosts: localhost, every node by name, and this machine's own name at
        the node's address (gloo and Ray find a node's address through the host name, which
        `ip netns exec` leaves as this machine's)."""
        lines = ["127.0.0.1 localhost"]
        if self.loopback_names:
            lines.append(f"127.0.1.1 {node.name}")
        lines += [f"{other.address} {other.name}" for other in self.nodes
                  if not (self.loopback_names and other is node)]
        lines.append(f"{node.address} {socket.gethostname()}")
        return "\n".join(lines) + "\n"

    def __enter__(self) -> "Network":
        self.remove()  # what a killed earlier run left
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, node in enumerate(self.nodes):
                host_end, node_end = f"{self.prefix}-h{i}", f"{self.prefix}-n{i}"
                subprocess.run(["ip", "netns", "add", node.namespace], check=True)
                # `ip netns exec` mounts /etc/netns/<name>/* over /etc: a name server that
                # answers "refused" at once, instead of the machine's, unreachable from here
                # (reverse lookups would otherwise wait seconds each)
                etc = Path("/etc/netns") / node.namespace
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
                (etc / "hosts").write_text(self.hosts_file(node))
                _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
                _ip("link", "set", node_end, "netns", node.namespace)
                _ip("link", "set", host_end, "master", self.bridge)
                _ip("link", "set", host_end, "up")
                _ip("link", "set", "lo", "up", ns=node.namespace)
                _ip("addr", "add", f"{node.address}/24", "dev", node_end, ns=node.namespace)
                _ip("link", "set", node_end, "up", ns=node.namespace)
                _ip("route", "add", "default", "via", self.host_address, ns=node.namespace)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for node in self.nodes:
            # processes still inside keep a namespace alive: end them first
            pids = subprocess.run(["ip", "netns", "pids", node.namespace], capture_output=True, text=True).stdout
            for pid in pids.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", node.namespace], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / node.namespace, ignore_errors=True)
        for i in range(self.count):
            subprocess.run(["ip", "link", "del", f"{self.prefix}-h{i}"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def command(self, index: int, argv: list[str]) -> list[str]:
        """`argv` run inside node `index`."""
        return ["ip", "netns", "exec", self.nodes[index].namespace, *argv]

    def popen(self, index: int, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(index, argv), **kwargs)

    def run(self, index: int, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(index, argv), **kwargs)
