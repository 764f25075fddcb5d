"""launch/slurm/ddetr.sbatch on a real Slurm (slurmctld + 2 slurmd, each node a network and
PID namespace with 1 CPU): a 2-node job trains with one Ray worker per node, on the job's
own ports and temp dirs, and stops its Ray; told that its time is up (SIGUSR1, as
`--signal=B:USR1@300` does) it saves a checkpoint, requeues itself, and the requeued job
resumes from that checkpoint; a cancelled job stays cancelled. Needs root, `ip netns`, `unshare` and Debian's
slurmctld, slurmd, slurm-client and munge: skipped without them, unless CI is set.
(tests/test_shell_scripts.py runs shellcheck over both sbatch scripts.)"""
from __future__ import annotations

import os
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
    with netns.Network("dds", 2) as net, SlurmCluster(net, tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def submit(slurm: SlurmCluster, workdir: Path, job_name: str, config: Path, overrides: str) -> tuple[int, Path]:
    out = workdir / f"{job_name}.out"
    env = {**RAY_ENV, "DDETR_CONFIG": str(config), "DDETR_OVERRIDES": overrides, "DDETR_VENV": str(VENV),
           "TMPDIR": str(slurm.tmp), "DDETR_RAY_START_ARGS": f"--object-store-memory={100 << 20}",
           "DDETR_RAY_WAIT_S": "120"}
    # no GPUs here: the script's 8-GPU, 64-CPU defaults are overridden as a user would
    job = slurm.sbatch(["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10", f"--job-name={job_name}",
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
    signalled_at: int  # the newest logged step when SIGUSR1 was sent
    steps: int


@pytest.fixture(scope="module")
def requeued_job(slurm, tiny_data, tmp_path_factory) -> FinishedJob:
    """One 2-node job, the way a long run meets its time limit: once it trains it gets
    SIGUSR1 (what `#SBATCH --signal=B:USR1@300` sends the batch shell), saves, requeues
    itself, and the requeued job resumes and finishes. Each Ray start costs
    ~1 minute on this machine: one job serves every check."""
    workdir = tmp_path_factory.mktemp("job")
    config = write_tiny_config(workdir / "tiny.yaml", tiny_data, workdir / "runs", "unused")
    # no periodic checkpoints and no epoch end (500 steps an epoch): the one it resumes from is
    # the one the signal asked for; steps enough (~0.35 s each here) that the run is still
    # going when the script, having seen that checkpoint, requeues and stops it
    steps = 60
    job, out = submit(slurm, workdir, "ddtiny", config,  # data.val_shards= : no evaluation
                      f"ray.cpus_per_worker=1 train.max_steps={steps} train.checkpoint_every_steps=0 "
                      "data.samples_per_epoch=2000 data.val_shards=")
    run_dir = workdir / "runs" / f"ddtiny-{job}"  # the default name: <job name>-<job id>
    wait_for(lambda: records(run_dir, "train") or slurm.job(job).get("JobState") not in {"PENDING", "RUNNING"},
             240, "the first step")
    assert records(run_dir, "train"), slurm.job(job).get("JobState") + out.read_text()[-5000:]
    slurm.client(["scancel", "--batch", "--signal=USR1", str(job)])
    signalled_at = max(r["step"] for r in records(run_dir, "train"))
    info = slurm.wait_for_state(job, "COMPLETED", timeout=360, log=out)
    return FinishedJob(job, info, out.read_text(), run_dir, signalled_at, steps)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_node_job_trains_on_both_nodes_and_stops_its_ray(slurm, requeued_job):
    job, log, run_dir = requeued_job.id, requeued_job.log, requeued_job.run_dir
    head, other = (node.address for node in slurm.net.nodes)
    port_base = 12000 + job % 40 * 500  # the job's own block of 500 ports
    assert f"ray.address={head}:{port_base}" in log and "ray.num_workers=2" in log, log
    assert log.count(f"all 2 Ray nodes joined: {head} {other}") == 2, log
    assert len(records(run_dir, "workers")) == 2
    for workers in records(run_dir, "workers"):  # one worker on each node, in both runs
        assert sorted(w["node_ip"] for w in workers["workers"]) == [head, other], workers
        assert len({w["node_id"] for w in workers["workers"]}) == 2
    assert records(run_dir, "final")[-1]["step"] == requeued_job.steps
    assert (run_dir / "model_final.pth").exists()
    # each node ran Ray in its own temp dir (a worker node's `ray start --temp-dir` included),
    # every port Ray recorded there (GCS, agents, metrics) in the job's block ...
    for node in slurm.net.nodes:
        session = slurm.tmp / f"ray-{job}-{node.namespace}" / "session_latest"
        assert (session / "sockets").is_dir(), node
        ports = {f.name.rsplit("_", 1)[0]: int(f.read_text()) for f in session.glob("*_port_*")}
        assert ports and all(port_base <= port < port_base + 500 for port in ports.values() if port != -1), ports
    # ... and the script stopped both, after each run (Ray's workers follow their raylet out)
    assert log.count("Ray stopped") == 2, log
    wait_for(lambda: not ray_processes_under(slurm.tmp), 15, "Ray's processes to end")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_job_near_its_time_limit_requeues_itself_and_resumes(requeued_job):
    job, log, run_dir, steps = requeued_job.id, requeued_job.log, requeued_job.run_dir, requeued_job.steps
    assert requeued_job.info["Restarts"] == "1", requeued_job.info
    assert "SIGUSR1 (the time limit is near): requeueing job" in log and f"job {job} (restart 1)" in log, log
    assert requeued_job.signalled_at < steps, "the run finished before the signal"
    # the signal made the run save (CHECKPOINT_NOW) before the requeue, and the requeued job
    # resumed from that checkpoint, exactly (same workers, same stage)
    assert "checkpoint saved" in log, log
    requested = records(run_dir, "checkpoint_requested")
    resumed = records(run_dir, "resume")
    assert len(requested) == 1 and requested[0]["step"] < steps, requested
    assert len(resumed) == 1 and resumed[0]["step"] == requested[0]["step"] and resumed[0]["exact"], resumed
    # the requeued job continued the same run (same name: the job id survives a requeue)
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
