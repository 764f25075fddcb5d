"""A real Slurm cluster on this machine (Debian's slurm-wlm 22.05 + munge): slurmctld in the
root namespace on the bridge address, one slurmd per network namespace (`netns.Network`)
and PID namespace, each a node with its own address, its own process table and the CPUs
(and logical GPUs) it is given, so that a 2-node job gets 2 machines as far as Slurm, srun
and Ray can tell (they share the file system, as nodes share an NFS mount). Nodes go by
their host names (NodeName = NodeAddr = `Node.name`), which every daemon resolves through
a hosts file: each node's own (`netns.Network`; with `loopback_names` its own name is
127.0.1.1 there, as on Debian), slurmctld's in a mount namespace of its own. Every file
(config, state, spool, logs, munge key and socket) lives in one work directory; `stop()`
ends every daemon and whatever jobs left running.

    with SlurmCluster(net, workdir, cpus=[2, 1], gpus=[2, 1]) as slurm:
        job = slurm.sbatch(["--nodes=2", "script.sbatch"], env=...)
        slurm.wait_for_state(job, "COMPLETED", timeout=120)
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from .netns import Network, stop_processes

# what the cluster runs: Debian's slurmctld, slurmd, slurm-client, munge (slurm-wlm has the
# first three), util-linux
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "srun", "unshare")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def slurm_conf(net: Network, workdir: Path, ctld_port: int, slurmd_port: int, cpus: list[int],
               gpus: list[int]) -> str:
    # NodeAddr is the host name, not the address: slurmctld, srun and the script resolve it,
    # each through its own hosts file, as on a cluster whose nodes are known by name
    nodes = "\n".join(f"NodeName={n.name} NodeAddr={n.name} CPUs={c}" + (f" Gres=gpu:{g}" if g else "")
                      + " State=UNKNOWN" for n, c, g in zip(net.nodes, cpus, gpus))
    # %n: each slurmd (one per node, same machine) needs its own spool, pid and log file
    return f"""\
ClusterName={net.prefix}
SlurmctldHost={socket.gethostname().split('.')[0]}({net.host_address})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s)
AuthInfo=socket={workdir}/munge/socket,cred_expire=15
StateSaveLocation={workdir}/state
SlurmdSpoolDir={workdir}/spool/%n
SlurmctldPidFile={workdir}/slurmctld.pid
SlurmdPidFile={workdir}/slurmd-%n.pid
SlurmctldLogFile={workdir}/slurmctld.log
SlurmdLogFile={workdir}/slurmd-%n.log
# no cgroups here: processes tracked by their parents, tasks not bound
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# look at pending jobs every 2 s, not 60: a requeued job starts as soon as it may
SchedulerParameters=sched_interval=2
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
# the hardware differs from what a node claims (CPUs, GPUs): take the config as it is
SlurmdParameters=config_overrides
# a quick teardown: SIGKILL 5 s after SIGTERM; finished jobs stay visible for 10 minutes
KillWait=5
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
{"GresTypes=gpu" if any(gpus) else ""}
{nodes}
# preemption as a site sets it up: a job in `urgent` preempts those in `debug`, which get
# --signal's signal at once (preempt_send_user_signal) and GraceTime to act on it
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=240
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2
"""


def gres_conf(net: Network, gpus: list[int], devices: Path) -> str:
    """Logical GPUs, which Slurm allocates and reports (SLURM_GPUS_ON_NODE, `scontrol show job
    -d`, CUDA_VISIBLE_DEVICES) like real ones: each a character device made here with NVIDIA's
    major number, which nothing opens. Slurm 22.05 drops a GPU without a device file ("Removing
    file-less GPU"), and takes a plain file only with an error in the log."""
    lines, first = [], 0
    for node, count in zip(net.nodes, gpus):
        if count:
            for minor in range(first, first + count):
                path = devices / f"nvidia{minor}"
                if not path.exists():
                    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(195, minor))
            files = f"nvidia{first}" if count == 1 else f"nvidia[{first}-{first + count - 1}]"
            lines.append(f"NodeName={node.name} Name=gpu File={devices}/{files}\n")
            first += count
    return "".join(lines)


class SlurmCluster:
    """`cpus`, `gpus`: each node's CPUs and logical GPUs (one number: the same on every node)."""

    def __init__(self, net: Network, workdir: Path, cpus: int | list[int] = 1, gpus: int | list[int] = 0):
        self.net, self.workdir = net, workdir
        self.conf = workdir / "slurm.conf"
        self.cpus = cpus if isinstance(cpus, list) else [cpus] * len(net.nodes)
        self.gpus = gpus if isinstance(gpus, list) else [gpus] * len(net.nodes)
        # the nodes' TMPDIR for jobs (give it to sbatch): short, as Ray's socket paths under it
        # must stay < 107 characters
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{net.prefix}-", dir="/tmp"))
        # clients (sbatch, scontrol; also srun inside jobs, which inherit it) read this
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- daemons

    def start(self, timeout: float = 60) -> None:
        for sub in ["munge", "state"] + [f"spool/{n.name}" for n in self.net.nodes]:
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self.conf.write_text(slurm_conf(self.net, self.workdir, free_port(), free_port(), self.cpus, self.gpus))
        (self.workdir / "dev").mkdir(exist_ok=True)
        (self.workdir / "gres.conf").write_text(gres_conf(self.net, self.gpus, self.workdir / "dev"))
        # slurmd loads a cgroup plugin even when nothing uses it, and its autodetection
        # fails inside `ip netns exec` (a fresh /sys without the cgroup mounts): name one
        (self.workdir / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")
        # slurmctld reaches the nodes by name: it gets this machine's /etc/hosts plus every
        # node's name, bound over /etc/hosts in a mount namespace of its own (the machine's
        # file stays as it is)
        hosts = self.workdir / "hosts"
        hosts.write_text(Path("/etc/hosts").read_text() + "".join(f"\n{n.address} {n.name}" for n in self.net.nodes)
                         + "\n")
        self._spawn("slurmctld", ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
                                  str(hosts), "slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(self._controller_answers, timeout, "slurmctld to answer")
        for i, node in enumerate(self.net.nodes):
            log = (self.workdir / f"slurmd-{node.name}.out").open("w")
            # each node in its own PID namespace too: it sees only its own processes, as a
            # machine does (`ray stop`, or Ray's search for the local raylet, stays on the
            # node); ending `unshare` kills the node's slurmd and every job process under it
            self.processes[f"slurmd {node.name}"] = self.net.popen(
                i, ["unshare", "--pid", "--mount-proc", "--kill-child",
                    "slurmd", "-D", "-N", node.name, "-f", str(self.conf)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self._wait(self._all_idle, timeout, f"{len(self.net.nodes)} nodes idle in sinfo")

    def _start_munge(self) -> None:
        munge = self.workdir / "munge"
        munge.chmod(0o700)  # munged refuses directories others may write
        key = munge / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        self._spawn("munged", ["munged", "-F", "--force", f"--socket={munge / 'socket'}", f"--key-file={key}",
                               f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                               f"--seed-file={munge / 'munged.seed'}"])
        self._wait(lambda: (munge / "socket").exists(), 20, "munged's socket")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.workdir / f"{name}.out").open("w")
        self.processes[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            dead = {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}:\n{self.logs()}")
            time.sleep(0.3)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}:\n{self.logs()}")

    def _controller_answers(self) -> bool:
        return self.client(["scontrol", "ping"], check=False).returncode == 0

    def _all_idle(self) -> bool:
        states = self.client(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split("\n")
        idle = {line.split()[0] for line in states if line.strip().endswith(" idle")}
        return idle == {n.name for n in self.net.nodes}

    def logs(self, tail: int = 3000) -> str:
        out = []
        for path in sorted(self.workdir.glob("*.log")) + sorted(self.workdir.glob("*.out")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def stop(self) -> None:
        # jobs first (their processes live in the node namespaces; Network.remove() kills
        # whatever is left there), then the daemons this object started, by pid
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            for partition in ("debug", "urgent"):
                self.client(["scancel", "--full", "--quiet", f"--partition={partition}"], check=False)
        for name in reversed(list(self.processes)):
            p = self.processes[name]
            if p.poll() is None and name.startswith("slurmd"):
                # `unshare` ignores SIGTERM; killed, it takes its node (PID namespace) along
                p.kill()
                p.wait()
            else:  # one at a time, in reverse order of start: munged goes last
                stop_processes([p], timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---------------------------------------------------------------- clients

    def client(self, argv: list[str], check: bool = True, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run(argv, env={**self.env, **kwargs.pop("env", {})}, capture_output=True, text=True,
                              timeout=timeout, **kwargs)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def sbatch(self, argv: list[str], env: dict | None = None, cwd: Path | None = None) -> int:
        done = self.client(["sbatch", "--parsable", *argv], env=env or {}, cwd=cwd)
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, NodeList, StdOut, ...)."""
        done = self.client(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        fields = {}
        for word in done.stdout.split():
            key, _, value = word.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_for_state(self, job_id: int, state: str, timeout: float, log: Path | None = None) -> dict:
        """Wait until the job reaches `state`; fail at once when it finishes in another."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            current = info.get("JobState", "")
            if current == state:
                return info
            if current in FINISHED:
                break
            time.sleep(0.5)
        output = log.read_text(errors="replace")[-6000:] if log is not None and log.exists() else ""
        raise AssertionError(f"job {job_id}: {self.job(job_id).get('JobState')} (wanted {state})\n"
                             f"--- job output\n{output}\n{self.logs()}")
