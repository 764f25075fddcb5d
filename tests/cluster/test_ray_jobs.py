"""`ray job submit` (through launch/submit.sh, the README's command) against a real 2-node
Ray cluster: each node its own network namespace and address, 1 CPU each, so the 2
workers of a run land on different nodes."""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from distributed.ray_helpers import records, registered_checkpoint_steps, wait_for, write_tiny_config

from . import netns
from .ray_cluster import RayCluster

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = netns.available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the cluster tests, but {reason}")
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("ray_cluster")
    with netns.Network("ddr", 2) as net:
        ray_cluster = RayCluster(net, workdir).start()
        try:
            yield ray_cluster
        finally:
            ray_cluster.stop()


def submit(cluster: RayCluster, job_id: str, *args: str) -> subprocess.CompletedProcess:
    env = {**cluster.env, "RAY_ADDRESS": cluster.dashboard_url, "DDETR_JOB_ID": job_id}
    return subprocess.run(["bash", str(REPO / "launch" / "submit.sh"), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def job_status(cluster: RayCluster, job_id: str) -> str:
    """SUCCEEDED, FAILED, STOPPED, RUNNING or PENDING: what `ray job status` says."""
    out = cluster.ray("job", "status", job_id).stdout
    ended = re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)", out)
    if ended:
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[ended.group(1)]
    running = re.search(rf"Status for job '{job_id}': (\w+)", out)
    return running.group(1) if running else out


def test_a_submitted_job_trains_across_both_nodes(cluster, tiny_data, tmp_path):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "job")
    done = submit(cluster, "job-ok", "--config", str(config), "train.max_steps=6", "train.checkpoint_every_steps=3")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert job_status(cluster, "job-ok") == "SUCCEEDED"
    run_dir = tmp_path / "runs" / "job"
    workers = records(run_dir, "workers")[0]["workers"]
    assert {w["node_ip"] for w in workers} == {node.address for node in cluster.net.nodes}
    assert len({w["node_id"] for w in workers}) == 2
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, 7))
    assert list(run_dir.glob("checkpoint_0*/meta.json")) and (run_dir / "model_final.pth").exists()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "AP50" in done.stdout  # the driver's summary reaches the submitter's terminal


def test_a_job_with_a_bad_config_fails_and_says_why(cluster, tiny_data, tmp_path):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "bad")
    done = submit(cluster, "job-bad", "--config", str(config), "optim.lrr=1e-4")
    assert done.returncode != 0
    assert job_status(cluster, "job-bad") == "FAILED"
    logs = cluster.ray("job", "logs", "job-bad").stdout
    assert "optim.lrr" in logs and "optim.lr" in logs, logs[-2000:]


def test_a_worker_that_fits_the_cluster_but_no_node_fails_at_once(cluster, tiny_data, tmp_path):
    # 2 CPUs in the cluster, 1 per node: summed over the cluster a 2-CPU worker fits, on no
    # node does (Ray Train would retry starting it forever)
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "wide")
    done = submit(cluster, "job-wide", "--config", str(config), "ray.num_workers=1", "ray.cpus_per_worker=2")
    assert done.returncode != 0
    logs = cluster.ray("job", "logs", "job-wide").stdout
    assert "each worker needs 2 CPU(s) on one node" in logs and "the largest has 1 CPUs" in logs, logs[-2000:]


def test_a_stopped_job_resumes_when_submitted_again(cluster, tiny_data, tmp_path):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "stopped")
    run_dir = tmp_path / "runs" / "stopped"
    args = ("--config", str(config), "train.max_steps=15", "train.checkpoint_every_steps=3")
    submitted = submit(cluster, "job-first", "--no-wait", *args)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-2000:]
    wait_for(lambda: registered_checkpoint_steps(run_dir), 300, "a registered checkpoint")
    stopped = cluster.ray("job", "stop", "job-first")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    wait_for(lambda: job_status(cluster, "job-first") == "STOPPED", 60, "the job to stop")
    time.sleep(2)  # its workers go with the driver
    assert not records(run_dir, "final")

    again = submit(cluster, "job-again", *args)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    resumed = records(run_dir, "resume")
    assert len(resumed) == 1 and resumed[0]["step"] >= 3 and resumed[0]["exact"]
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, 16))
    assert records(run_dir, "final")[-1]["step"] == 15
