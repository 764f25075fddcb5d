"""A node's preemption announced by Ray (docs/preemption.md), on a real Ray cluster made like
a cloud one (`ray_cluster.py`: a CPU head and 2 worker nodes of 1 CPU, each its own network
namespace, host name and file system): mid-run, `ray drain-node --reason
DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds 60` on one worker node, what the
autoscaler does for a spot node. The run saves at the step of the notice, before the deadline;
the node is then lost (every process in it killed at once) and replaced; Ray Train restarts the
workers and the run finishes, every step logged once. SIGTERM: tests/distributed/test_sigterm.py."""
from __future__ import annotations

import subprocess
import time

import pytest

from distributed.ray_helpers import records, registered_checkpoint_steps, wait_for, write_tiny_config

from .ray_cluster import GCS_PORT
from .ray_fixtures import FAST_HEALTH_CHECKS, job_succeeded, running_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DRAINED_NODE = 2  # a worker node (0 is the head)
DEADLINE_S = 60
STEPS = 30


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_data):
    workdir = tmp_path_factory.mktemp("preemption_cluster")
    with running_cluster(workdir, tiny_data, "ddp", FAST_HEALTH_CHECKS) as ray_cluster:
        yield ray_cluster


def test_a_drained_node_makes_the_run_save_before_its_deadline_and_the_run_finishes_after_it_goes(cluster, checkout):
    name = "drained"
    write_tiny_config(checkout / f"{name}.yaml", cluster.shared / "data", cluster.shared / "runs", name)
    run_dir = cluster.shared / "runs" / name
    # no periodic checkpoints: the one at the notice is the run's own doing (Ray Train's
    # watcher polls the drained nodes every second here instead of 5)
    submitted = subprocess.run(
        ["bash", "launch/submit.sh", "--no-wait", "--config", f"{name}.yaml", f"train.max_steps={STEPS}",
         "train.checkpoint_every_steps=0", "train.pictures=0", "train.eval_every_epochs=0"],
        env=cluster.client_env(DDETR_JOB_ID="job-drained", DDETR_ENV="RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S=1"),
        cwd=checkout, capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-2000:]

    wait_for(lambda: any(r["step"] >= 2 for r in records(run_dir, "train")), 300, "step 2")
    workers = records(run_dir, "workers")[0]["workers"]
    drained = next(w for w in workers if w["host"] == cluster.net.nodes[DRAINED_NODE].name)
    drain = cluster.on_node(0, ["ray", "drain-node", "--address", f"{cluster.head.name}:{GCS_PORT}",
                                "--node-id", drained["node_id"], "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                                "--reason-message", "spot instance reclaimed",
                                "--deadline-remaining-seconds", str(DEADLINE_S)])
    drained_at = time.monotonic()
    assert drain.returncode == 0, drain.stdout + drain.stderr
    notice = wait_for(lambda: records(run_dir, "notice"), DEADLINE_S, "the preemption notice")[0]
    assert notice["source"] == "preemption" and not notice["stop"], notice
    assert drained["node_id"][:12] in notice["detail"] and f"ranks {drained['rank']}" in notice["detail"], notice
    step = notice["step"]
    wait_for(lambda: step in registered_checkpoint_steps(run_dir), DEADLINE_S, f"the checkpoint of step {step}")
    saved_after_s = time.monotonic() - drained_at
    assert saved_after_s < DEADLINE_S  # saved (and registered) before the node goes
    assert step < STEPS, "the run ended before the notice"

    # the cloud takes the node; a replacement joins (Ray Train restarts the workers at the deadline)
    cluster.lose_node(DRAINED_NODE)
    cluster.start_node(DRAINED_NODE)
    wait_for(lambda: job_succeeded(cluster, "job-drained"), 420, "the job to finish")
    resumed = records(run_dir, "resume")
    assert len(resumed) == 1 and resumed[0]["step"] >= step and resumed[0]["exact"], resumed
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, STEPS + 1))
    assert records(run_dir, "final")[-1]["step"] == STEPS
    print(f"saved {saved_after_s:.0f} s after the drain, at step {step}; resumed at step {resumed[0]['step']}")
