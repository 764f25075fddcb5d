"""`ray job submit` (through launch/submit.sh, docs/clusters.md's command, run from a user's copy
of the code with relative paths and its client setup) against a real Ray cluster made
like a cloud one (`ray_cluster.py`): a CPU head and 2 worker nodes of 1 CPU, each node its
own network namespace, host name and file system, sharing one directory (the NFS mount) and
the Python environment without our package: the code reaches the nodes only as the job's
working_dir."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from ddetr_dist.storage import Store
from distributed.ray_helpers import records, registered_checkpoint_steps, wait_for, write_tiny_config

from .ray_cluster import RayCluster
from .ray_fixtures import running_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_data):
    with running_cluster(tmp_path_factory.mktemp("ray_cluster"), tiny_data, "ddr", with_s3=True) as ray_cluster:
        yield ray_cluster


def tiny_config(cluster: RayCluster, checkout: Path, name: str) -> str:
    """A config in the user's checkout, named relative to it; data and runs on the shared mount."""
    write_tiny_config(checkout / f"{name}.yaml", cluster.shared / "data", cluster.shared / "runs", name)
    return f"{name}.yaml"


def submit(cluster: RayCluster, checkout: Path, job_id: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "launch/submit.sh", *args], env=cluster.client_env(DDETR_JOB_ID=job_id),
                          cwd=checkout, capture_output=True, text=True, timeout=600)


def job_status(cluster: RayCluster, job_id: str) -> str:
    """SUCCEEDED, FAILED, STOPPED, RUNNING or PENDING: what `ray job status` says."""
    out = cluster.ray("job", "status", job_id).stdout
    ended = re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)", out)
    if ended:
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[ended.group(1)]
    running = re.search(rf"Status for job '{job_id}': (\w+)", out)
    return running.group(1) if running else out


def test_the_nodes_are_separate_machines(cluster):
    # what makes the other tests mean something: a node has no checkout (our package comes
    # only with a job), its own /tmp, its own name, and it resolves the others by name
    probe = ("import socket, os, importlib.util; "
             "print(socket.gethostname(), importlib.util.find_spec('ddetr_dist') is None, "
             "os.path.exists(%r), socket.gethostbyname(%r))" % (str(cluster.workdir / "ray-node0.log"),
                                                                 cluster.head.name))
    for i, node in enumerate(cluster.net.nodes):
        done = cluster.on_node(i, ["python", "-c", probe])
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [node.name, "True", "False", cluster.head.address]
    assert cluster.on_node(1, ["ls", str(cluster.shared / "data")]).returncode == 0


@pytest.fixture(scope="module")
def trained(cluster, checkout) -> tuple[subprocess.CompletedProcess, Path]:
    """One submitted training (the eval test reads its run too)."""
    config = tiny_config(cluster, checkout, "job")
    done = submit(cluster, checkout, "job-ok", "--config", config, "train.max_steps=6",
                  "train.checkpoint_every_steps=3")
    return done, cluster.shared / "runs" / "job"


def test_a_submitted_job_trains_across_both_worker_nodes(cluster, trained):
    done, run_dir = trained
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert job_status(cluster, "job-ok") == "SUCCEEDED"
    workers = records(run_dir, "workers")[0]["workers"]
    assert {w["node_ip"] for w in workers} == {node.address for node in cluster.net.nodes[1:]}
    assert {w["host"] for w in workers} == {node.name for node in cluster.net.nodes[1:]}
    # the code each worker ran came with the job (Ray's unpacked working_dir), not a checkout
    assert all("/runtime_resources/working_dir_files/" in w["package"] for w in workers), workers
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, 7))
    assert list(run_dir.glob("checkpoint_0*/meta.json")) and (run_dir / "model_final.pth").exists()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "AP50" in done.stdout  # the driver's summary reaches the submitter's terminal


def test_eval_on_two_worker_nodes_writes_its_results_where_the_driver_runs(cluster, checkout, trained):
    # The job's driver runs on the head, which has no workers; its out dir is in the head's
    # own /tmp, which no worker node has: the results must come back through Ray.
    assert trained[0].returncode == 0, trained[0].stdout[-3000:]
    done = cluster.ray("job", "submit", "--submission-id", "job-eval", "--working-dir", str(checkout), "--",
                       "python", "-m", "ddetr_dist.eval", "--checkpoint", str(trained[1]), "--out", "/tmp/eval-out",
                       "ray.num_workers=2")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "AP50" in done.stdout
    head_files = cluster.on_node(0, ["ls", "/tmp/eval-out"])
    assert head_files.stdout.split() == ["detections.json", "metrics.json"], head_files
    for worker_node in (1, 2):
        assert cluster.on_node(worker_node, ["ls", "/tmp/eval-out"]).returncode != 0


def test_a_job_with_a_bad_config_fails_and_says_why(cluster, checkout):
    done = submit(cluster, checkout, "job-bad", "--config", tiny_config(cluster, checkout, "bad"), "optim.lrr=1e-4")
    assert done.returncode != 0
    assert job_status(cluster, "job-bad") == "FAILED"
    logs = cluster.ray("job", "logs", "job-bad").stdout
    assert "optim.lrr" in logs and "optim.lr" in logs, logs[-2000:]


def test_a_worker_that_fits_the_cluster_but_no_node_fails_at_once(cluster, checkout):
    # 2 CPUs in the cluster, 0 on the head and 1 per worker node: summed over the cluster a
    # 2-CPU worker fits, on no node does (Ray Train would retry starting it forever)
    done = submit(cluster, checkout, "job-wide", "--config", tiny_config(cluster, checkout, "wide"),
                  "ray.num_workers=1", "ray.cpus_per_worker=2")
    assert done.returncode != 0
    logs = cluster.ray("job", "logs", "job-wide").stdout
    assert "each worker needs 2 CPU(s) on one node" in logs and "the largest has 1 CPUs" in logs, logs[-2000:]


def test_a_stopped_job_resumes_when_submitted_again(cluster, checkout):
    run_dir = cluster.shared / "runs" / "stopped"
    args = ("--config", tiny_config(cluster, checkout, "stopped"), "train.max_steps=15",
            "train.checkpoint_every_steps=3")
    submitted = submit(cluster, checkout, "job-first", "--no-wait", *args)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-2000:]
    wait_for(lambda: registered_checkpoint_steps(run_dir), 300, "a registered checkpoint")
    stopped = cluster.ray("job", "stop", "job-first")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    wait_for(lambda: job_status(cluster, "job-first") == "STOPPED", 60, "the job to stop")
    time.sleep(2)  # its workers go with the driver
    assert not records(run_dir, "final")

    again = submit(cluster, checkout, "job-again", *args)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    resumed = records(run_dir, "resume")
    assert len(resumed) == 1 and resumed[0]["step"] >= 3 and resumed[0]["exact"]
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, 16))
    assert records(run_dir, "final")[-1]["step"] == 15


def store_records(store: Store, event: str) -> list[dict]:
    text = store.read_bytes("metrics.jsonl").decode() if store.is_file("metrics.jsonl") else ""
    return [r for r in map(json.loads, text.splitlines()) if r.get("event") == event]


def test_a_run_in_object_storage_resumes_from_the_store_after_its_driver_is_stopped(cluster, checkout, monkeypatch):
    # No shared mount for the run: every node writes to the store and reads it back, with the
    # keys its Ray was started with (the client has none: the driver runs on the head)
    for key, value in cluster.s3.env.items():
        monkeypatch.setenv(key, value)  # this test's own reads of the store
    cluster.s3.make_bucket("team-runs")
    store = Store("s3://team-runs/detr/stored")
    args = ("--config", tiny_config(cluster, checkout, "stored"), "output_dir=s3://team-runs/detr",
            "train.max_steps=12", "train.checkpoint_every_steps=3")
    submitted = submit(cluster, checkout, "job-s3-first", "--no-wait", *args)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-2000:]
    wait_for(lambda: store_records(store, "checkpoint") or job_status(cluster, "job-s3-first") == "FAILED", 300,
             "a checkpoint in the store")
    assert store_records(store, "checkpoint"), cluster.ray("job", "logs", "job-s3-first").stdout[-5000:]
    time.sleep(2)  # Ray's controller registers it after the workers' report
    stopped = cluster.ray("job", "stop", "job-s3-first")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    wait_for(lambda: job_status(cluster, "job-s3-first") == "STOPPED", 60, "the job to stop")
    time.sleep(2)
    assert not store.is_file("final_metrics.json")

    again = submit(cluster, checkout, "job-s3-again", *args)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    resumed = store_records(store, "resume")
    assert len(resumed) == 1 and resumed[0]["step"] >= 3 and resumed[0]["exact"], resumed
    assert [r["step"] for r in store_records(store, "train")] == list(range(1, 13))
    assert store_records(store, "final")[-1]["step"] == 12
    files = store.files()
    assert {"config.yaml", "deepspeed_config.json", "model_final.pth", "final_metrics.json"} <= set(files)
    assert any(name.startswith("checkpoint_0") and name.endswith("/meta.json") for name in files)
    assert any(name.startswith("tensorboard/events.out.tfevents.") for name in files)
    assert any(name.startswith("eval/") and name.endswith("/metrics.json") for name in files)
    assert not (cluster.shared / "runs" / "stored").exists()  # nothing went to the shared mount
    assert "done: s3://team-runs/detr/stored" in again.stdout and "AP50" in again.stdout

    # ddetr eval reads the run from the store (one process, on the head) and puts its results there
    done = cluster.ray("job", "submit", "--submission-id", "job-s3-eval", "--working-dir", str(checkout), "--",
                       "python", "-m", "ddetr_dist.eval", "--checkpoint", store.uri, "ray.num_workers=1")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "AP50" in done.stdout and f"-> {store.uri}/eval/manual-" in done.stdout
    assert any(name.startswith("eval/manual-") and name.endswith("/metrics.json") for name in store.files())
