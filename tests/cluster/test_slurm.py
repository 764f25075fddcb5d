"""launch/slurm/ddetr.sbatch on a real Slurm (slurmctld + 2 slurmd, each node a network and
PID namespace, named by host name, whose own name resolves to 127.0.1.1 on it as on Debian;
node 0 has 2 CPUs and 2 logical GPUs, node 1 one of each): a 2-node job trains with one Ray
worker per node, each node at its routable address, on the job's own ports and temp dirs,
and stops its Ray; preempted by a job of a higher partition (Slurm sends the script's
`--signal`, SIGUSR1, at once: preempt_send_user_signal; the time limit's warning takes the same
path) it saves a checkpoint, requeues itself, and the requeued job resumes from that
checkpoint; a cancelled job stays cancelled; a job with whole nodes gives each node's Ray that node's own
CPUs and GPUs. Needs root, `ip netns`, `unshare` and Debian's slurmctld, slurmd, slurm-client
and munge: skipped without them, unless CI is set. The script's helpers (addresses, Ray's
temp dir, Slurm's counts) are also tested alone, in a bash without Slurm.
(tests/test_shell_scripts.py runs shellcheck over the script.)"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from distributed.ray_helpers import RAY_ENV, records, wait_for, write_tiny_config

from . import netns
from .slurm_cluster import SlurmCluster, missing_commands

SBATCH = Path(__file__).resolve().parents[2] / "launch" / "slurm" / "ddetr.sbatch"
VENV = Path(sys.executable).parent.parent  # the nodes run this checkout's venv, as a cluster's image would


def require(reason: str | None) -> None:
    """Skip with the reason; under CI (which installs everything) fail instead."""
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test, but: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_commands()
    require(netns.available() or (f"Slurm is not installed (no {', '.join(missing)}): "
                                  "tools/install_test_deps.sh (slurm-wlm munge)" if missing else None))
    # unequal nodes (SlurmdParameters=config_overrides lets a node claim what this machine
    # lacks); the jobs below that ask for 1 CPU and no GPU per node get equal shares
    with netns.Network("dds", 2, loopback_names=True) as net, \
            SlurmCluster(net, tmp_path_factory.mktemp("slurm"), cpus=[2, 1], gpus=[2, 1]) as cluster:
        yield cluster


def submit(slurm: SlurmCluster, workdir: Path, job_name: str, config: Path, overrides: str,
           allocation: tuple[str, ...] = ("--gpus-per-node=0", "--cpus-per-task=1"),
           env: dict | None = None) -> tuple[int, Path]:
    out = workdir / f"{job_name}.out"
    env = {**RAY_ENV, "DDETR_CONFIG": str(config), "DDETR_OVERRIDES": overrides, "DDETR_VENV": str(VENV),
           "TMPDIR": str(slurm.tmp), "DDETR_RAY_START_ARGS": f"--object-store-memory={100 << 20}",
           "DDETR_RAY_WAIT_S": "120", **(env or {})}
    # by default 1 CPU and no GPU per node: the script's 8-GPU, 64-CPU defaults are
    # overridden as a user would
    job = slurm.sbatch(["--nodes=2", *allocation, "--time=10", f"--job-name={job_name}",
                        f"--output={out}", str(SBATCH)], env=env, cwd=workdir)
    return job, out


def ray_processes_under(root: Path) -> list[str]:
    """Command lines of live processes that mention `root` (Ray's name their temp dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def ended(info: dict) -> dict | None:
    """The job's fields once it left RUNNING/COMPLETING (for a requeued one: PENDING)."""
    return info if info.get("JobState") not in {"RUNNING", "COMPLETING"} else None


@dataclass
class FinishedJob:
    id: int
    info: dict  # scontrol show job, once COMPLETED
    log: str  # the job's output: both runs (--open-mode=append)
    run_dir: Path
    preempted_at: int  # the newest logged step when the preempting job was submitted
    steps: int
    urgent: dict  # scontrol show job of the job that preempted it, once COMPLETED


@pytest.fixture(scope="module")
def preempted_job(slurm, tiny_data, tmp_path_factory) -> FinishedJob:
    """One 2-node job, the way a spot-like partition loses its nodes: once it trains, a job in
    the `urgent` partition (PriorityTier 2) needs both nodes, so Slurm preempts it and, with
    preempt_send_user_signal, sends the batch shell the job's `--signal` (SIGUSR1) at once,
    GraceTime before the kill; the script saves, requeues the job, the urgent job runs, and
    the requeued job resumes and finishes. Each Ray start costs ~1 minute on this machine:
    one job serves every check."""
    workdir = tmp_path_factory.mktemp("job")
    config = write_tiny_config(workdir / "tiny.yaml", tiny_data, workdir / "runs", "unused")
    # no periodic checkpoints and no epoch end (500 steps an epoch): the one it resumes from is
    # the one the signal asked for; steps enough (~0.35 s each here) that the run is still
    # going when the script has it save and stop
    steps = 60
    job, out = submit(slurm, workdir, "ddtiny", config,  # data.val_shards= : no evaluation
                      f"ray.cpus_per_worker=1 train.max_steps={steps} train.checkpoint_every_steps=0 "
                      "data.samples_per_epoch=2000 data.val_shards=")
    run_dir = workdir / "runs" / f"ddtiny-{job}"  # the default name: <job name>-<job id>
    wait_for(lambda: records(run_dir, "train") or slurm.job(job).get("JobState") not in {"PENDING", "RUNNING"},
             240, "the first step")
    assert records(run_dir, "train"), slurm.job(job).get("JobState") + out.read_text()[-5000:]
    urgent = slurm.sbatch(["--partition=urgent", "--nodes=2", "--cpus-per-task=1", "--gpus-per-node=0",
                           f"--output={workdir / 'urgent.out'}", "--wrap", "sleep 1"], cwd=workdir)
    preempted_at = max(r["step"] for r in records(run_dir, "train"))
    info = slurm.wait_for_state(job, "COMPLETED", timeout=420, log=out)
    return FinishedJob(job, info, out.read_text(), run_dir, preempted_at, steps,
                       slurm.wait_for_state(urgent, "COMPLETED", timeout=30))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_node_job_trains_on_both_nodes_and_stops_its_ray(slurm, preempted_job):
    job, log, run_dir = preempted_job.id, preempted_job.log, preempted_job.run_dir
    head, other = (node.address for node in slurm.net.nodes)
    port_base = 12000 + job % 40 * 500  # the job's own block of 500 ports
    assert f"ray.address={head}:{port_base}" in log and "ray.num_workers=2" in log, log
    assert log.count(f"all 2 Ray nodes joined: {head} {other}") == 2, log
    # each node's NodeAddr (its name) is 127.0.1.1 on that node: each found its own address
    # on the network instead, and said so, in both runs
    for node in slurm.net.nodes:
        assert log.count(f"node {node.name}: its NodeAddr '{node.name}' resolves to 127.0.1.1 here: "
                         f"using {node.address}") == 2, log
        assert log.count(f"node {node.name} ({node.address}): 1 CPUs, 0 GPUs, 1 workers") == 2, log
    assert len(records(run_dir, "workers")) == 2
    for workers in records(run_dir, "workers"):  # one worker on each node, in both runs
        assert sorted(w["node_ip"] for w in workers["workers"]) == [head, other], workers
        assert len({w["node_id"] for w in workers["workers"]}) == 2
    assert records(run_dir, "final")[-1]["step"] == preempted_job.steps
    assert (run_dir / "model_final.pth").exists()
    # each node ran Ray in its own temp dir (a worker node's `ray start --temp-dir` included),
    # every port Ray recorded there (GCS, agents, metrics) in the job's block ...
    for node in slurm.net.nodes:
        session = slurm.tmp / f"ray-{job}-{node.name}" / "session_latest"
        assert (session / "sockets").is_dir(), node
        ports = {f.name.rsplit("_", 1)[0]: int(f.read_text()) for f in session.glob("*_port_*")}
        assert ports and all(port_base <= port < port_base + 500 for port in ports.values() if port != -1), ports
    # ... and the script stopped both, after each run (Ray's workers follow their raylet out)
    assert log.count("Ray stopped") == 2, log
    # each node checked the op before its Ray started (built once, in the shared cache)
    for node in slurm.net.nodes:
        assert f"node {node.name}: msda op: compiled (cpu, checked)" in log, log
    wait_for(lambda: not ray_processes_under(slurm.tmp), 15, "Ray's processes to end")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_preempted_job_saves_requeues_itself_and_resumes_from_that_step(preempted_job):
    job, log, run_dir, steps = preempted_job.id, preempted_job.log, preempted_job.run_dir, preempted_job.steps
    assert preempted_job.info["Restarts"] == "1", preempted_job.info
    assert "SIGUSR1 (the time limit is near, or the job is preempted): requeueing job" in log, log
    assert f"job {job} (restart 1)" in log, log
    assert preempted_job.preempted_at < steps, "the run finished before the preemption"
    # the urgent job ran between the two runs of this one (StartTime: the requeued run's)
    assert preempted_job.urgent["EndTime"] <= preempted_job.info["StartTime"], (preempted_job.urgent, preempted_job.info)
    # the signal had the driver save (SIGTERM to it: its workers saved at their next step)
    # before the requeue, and the requeued job resumed from that checkpoint, exactly (same
    # workers, same stage)
    assert "stopped on SIGTERM after saving a checkpoint" in log, log
    notices = records(run_dir, "notice")
    resumed = records(run_dir, "resume")
    assert len(notices) == 1 and notices[0]["source"] == "driver", notices
    assert preempted_job.preempted_at <= notices[0]["step"] < steps, notices
    assert len(resumed) == 1 and resumed[0]["step"] == notices[0]["step"] and resumed[0]["exact"], resumed
    # the requeued job continued the same run (same name: the job id survives a requeue),
    # every step logged once
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, steps + 1))
    assert records(run_dir, "final")[-1]["step"] == steps


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cancelled_job_stays_cancelled(slurm, tiny_data, tmp_path):
    """scancel sends SIGTERM too: the script must stop on it, not requeue (a requeue there
    would bring the cancelled job back)."""
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "unused")
    job, out = submit(slurm, tmp_path, "ddcancel", config, "train.max_steps=1000")
    wait_for(lambda: out.exists() and f"job {job} (restart 0)" in out.read_text(), 120, "the script's start")
    slurm.client(["scancel", str(job)])
    info = wait_for(lambda: ended(slurm.job(job)), 60, "the job to end")
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", (info, out.read_text()[-3000:])
    # (the trap may not even run: SIGTERM reaches every process of the job, and a foreground
    # command that dies of it ends the script first)
    assert "requeueing" not in out.read_text() and "Ray stopped" in out.read_text(), out.read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_node_whose_op_cannot_be_built_fails_the_job_before_ray_starts(slurm, tiny_data, tmp_path):
    # an empty build cache and a compiler that fails: the op check before `ray start`
    # stops the job with the build's message, instead of workers failing (or, before,
    # falling back to the slow reference on GPUs) after Ray and the run started
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "unused")
    job, out = submit(slurm, tmp_path, "ddnoop", config, "train.max_steps=2",
                      env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "empty-cache"), "CXX": "/bin/false"})
    slurm.wait_for_state(job, "FAILED", timeout=120, log=out)
    log = out.read_text()
    head = slurm.net.nodes[0].name
    assert "msda op: cannot be used on cpu" in log and "/bin/false" in log, log[-3000:]
    assert f"error: node {head}: the MSDA op cannot be built" in log, log[-3000:]
    assert not (slurm.tmp / f"ray-{job}-{head}").exists()  # the head's Ray never started
    assert "ddetr train" not in log


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_nodes_that_differ_each_offer_their_own_cpus_and_gpus(slurm, tiny_data, tmp_path):
    """Whole nodes (--exclusive) of unequal size: node 0 has 2 CPUs and 2 (logical) GPUs,
    node 1 one of each. Each node's Ray offers its own, one worker per GPU (3 in all), with
    the CPUs per worker the smaller node can give. The run trains on CPU (`ray.use_gpu=false`:
    the overrides win) while Ray offers the GPUs."""
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "unused")
    job, out = submit(slurm, tmp_path, "ddmixed", config, "ray.use_gpu=false train.max_steps=2 data.val_shards=",
                      allocation=("--exclusive", "--gpus-per-node=1", "--cpus-per-task=1"))
    slurm.wait_for_state(job, "COMPLETED", timeout=360, log=out)
    log = out.read_text()
    (big, small), run_dir = slurm.net.nodes, tmp_path / "runs" / f"ddmixed-{job}"
    assert f"node {big.name} ({big.address}): 2 CPUs, 2 GPUs, 2 workers" in log, log
    assert f"node {small.name} ({small.address}): 1 CPUs, 1 GPUs, 1 workers" in log, log
    assert f"Ray node {big.address}: 2 CPUs, 2 GPUs" in log and f"Ray node {small.address}: 1 CPUs, 1 GPUs" in log, log
    assert "ray.num_workers=3 ray.cpus_per_worker=1 ray.use_gpu=true" in log, log
    assert "3 workers with 1 CPUs each (the least any node gives each of its workers)" in log, log
    workers = records(run_dir, "workers")[0]["workers"]
    assert sorted(w["node_ip"] for w in workers) == sorted([big.address, big.address, small.address]), workers
    assert records(run_dir, "final")[-1]["step"] == 2


# ------------------------------------------------------------------ the script's helpers alone

def sbatch_function(*names: str, script: Path = SBATCH) -> str:
    """The script's functions `names`, as source for a bash (the script itself needs Slurm)."""
    text = script.read_text()
    found = []
    for name in names:
        match = re.search(rf"^{name}\(\) \{{\n.*?^\}}\n", text, re.M | re.S)
        assert match, f"no function {name}() in {script}"
        found.append(match.group(0))
    return "log() { printf '[ddetr.sbatch] %s\\n' \"$*\"; }\n" + "".join(found)


def bash(source: str, code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -euo pipefail\n{source}\n{code}"], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=30)


def test_ray_temp_dir_stays_short_with_a_long_node_name(tmp_path):
    """Ray's socket paths under the temp dir must stay < 107 characters: the dir < 44, even
    when the fallback to /tmp is not enough because the node name itself is long."""
    source = sbatch_function("ray_temp_dir")
    env = {"SLURM_JOB_ID": "4294967295", "TMPDIR": "/scratch/local/jobs/" + "t" * 30}
    names = ["n" * 60, "n" * 59 + "m", "gpu01"]
    dirs = bash(source, "for n in " + " ".join(names) + "; do ray_temp_dir \"$n\"; done", env).stdout.split()
    assert len(dirs) == 3 and all(len(d) < 44 for d in dirs), dirs
    assert dirs[0] != dirs[1], dirs  # two long names on one machine: two dirs
    assert dirs[2] == "/tmp/ray-4294967295-gpu01", dirs  # a short name still shows
    short = bash(source, "ray_temp_dir gpu01", {**env, "TMPDIR": "/tmp"}).stdout.strip()
    assert short == "/tmp/ray-4294967295-gpu01"


def test_slurm_counts_are_read_per_node():
    source = sbatch_function("expand_counts", "gpus_in_gres", "allocated_gpus")
    assert bash(source, 'expand_counts "4(x2),2,1(x1)"').stdout.split() == ["4", "4", "2", "1"]
    assert bash(source, 'expand_counts "4(x2),junk"').returncode != 0
    for gres, gpus in [("gpu:2(IDX:0-1)", 2), ("gpu:a100:8(IDX:0-7)", 8), ("gpu:1(IDX:0),gpu:tesla:2(IDX:1,3)", 3),
                       ("shard:4(1/2),gpu:1(IDX:0)", 1), ("", 0)]:
        assert bash(source, f'gpus_in_gres "{gres}"').stdout.strip() == str(gpus), gres
    detail = ("JobId=7 JobName=ddetr\n   NumNodes=3 NumCPUs=5\n     Nodes=big[1-2] CPU_IDs=0-1 Mem=0 "
              "GRES=gpu:h100:2(IDX:0-1)\n     Nodes=small CPU_IDs=0 Mem=0 GRES=\n")
    # scontrol expands the node lists: a stand-in for it here
    fake = "scontrol() { case $3 in big*) echo big1; echo big2;; *) echo \"$3\";; esac; }\n"
    assert bash(source + fake, f"allocated_gpus <<<'{detail}'").stdout.split("\n")[:2] == ["big1 2", "big2 2"]


@pytest.fixture
def stub_commands(tmp_path):
    """A bin directory first on PATH, for stand-ins of getent, ip and hostname."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def stub(name: str, output: str) -> None:
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\n")
        path.chmod(0o755)
    return bin_dir, stub


def test_a_node_name_on_loopback_means_the_nodes_interface_address(stub_commands):
    bin_dir, stub = stub_commands
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    source = sbatch_function("routable_address")
    stub("getent", "127.0.1.1       STREAM gpu07\n127.0.1.1       DGRAM  \n")
    stub("ip", "10.0.0.9 via 10.7.0.1 dev eth0 src 10.7.0.17 uid 0\n    cache\n")
    stub("hostname", "172.17.0.1 10.7.0.17\n")
    done = bash(source, "routable_address gpu07 gpu07 10.0.0.9", env)
    assert done.returncode == 0 and done.stdout == "10.7.0.17\n", done
    assert "node gpu07: its NodeAddr 'gpu07' resolves to 127.0.1.1 here: using 10.7.0.17" in done.stderr
    # no route to ask about (the head of a job whose other nodes it cannot resolve): hostname -I
    stub("hostname", "fe80::1 10.7.0.18 172.17.0.1\n")
    assert bash(source, "routable_address gpu07 gpu07 ''", env).stdout == "10.7.0.18\n"
    # a name that resolves to the network is taken as it is
    stub("getent", "10.7.0.3        STREAM gpu03\n10.7.0.3        DGRAM  \n")
    assert bash(source, "routable_address gpu03 gpu03 10.0.0.9", env).stdout == "10.7.0.3\n"


def test_a_node_without_a_routable_address_fails_naming_what_to_fix(stub_commands):
    bin_dir, stub = stub_commands
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    stub("getent", "127.0.1.1       STREAM gpu07\n")
    stub("ip", "")
    stub("hostname", "")
    done = bash(sbatch_function("routable_address"), "routable_address gpu07 gpu07.cluster 10.0.0.9", env)
    assert done.returncode != 0 and done.stdout == "", done
    for words in ("node gpu07", "'gpu07.cluster' resolves to 127.0.1.1", "/etc/hosts or DNS", "NodeAddr=<its IP>"):
        assert words in done.stderr, done.stderr
