"""Elastic worker count (`ray.num_workers=1-2`, docs/elastic.md) on a real Ray cluster made
like a cloud one (`ray_cluster.py`: a CPU head and 2 worker nodes of 1 CPU, each its own
network namespace, host name and file system): a job starts on both worker nodes, one node
dies mid-run (every process in it killed at once), the run continues on the worker that is
left instead of waiting, the node comes back, the run grows to 2 workers again and finishes,
every step logged once."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from distributed.ray_helpers import records, registered_checkpoint_steps, wait_for, write_tiny_config

from .ray_fixtures import FAST_HEALTH_CHECKS, job_succeeded, running_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

LOST_NODE = 2  # a worker node (0 is the head)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_data):
    workdir = tmp_path_factory.mktemp("elastic_cluster")
    with running_cluster(workdir, tiny_data, "dde", FAST_HEALTH_CHECKS) as ray_cluster:
        yield ray_cluster


def world_sizes(run_dir: Path) -> list[int]:
    """The world size of each start of the workers, in order."""
    return [r["world_size"] for r in records(run_dir, "world_size")]


def test_a_run_shrinks_when_a_node_is_lost_and_grows_back_when_it_returns(cluster, checkout):
    name, steps = "elastic", 40
    write_tiny_config(checkout / f"{name}.yaml", cluster.shared / "data", cluster.shared / "runs", name)
    run_dir = cluster.shared / "runs" / name
    # a resize restarts the workers from the last checkpoint: one every 2 steps loses little.
    # Ray's view of the nodes is refreshed every 20 s; it asks every resize_check_s whether to grow.
    # Right after the loss that view may still count the dead node: a restart at 2 workers then
    # waits for a placement that never comes, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by
    # default), before Ray tries again with what is left
    submitted = subprocess.run(
        ["bash", "launch/submit.sh", "--no-wait", "--config", f"{name}.yaml", "ray.num_workers=1-2",
         "ray.resize_check_s=2", f"train.max_steps={steps}", "train.checkpoint_every_steps=2", "train.pictures=0",
         "train.eval_every_epochs=0", "ray.max_failures=2"],
        env=cluster.client_env(DDETR_JOB_ID="job-elastic", DDETR_ENV="RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=30"),
        cwd=checkout, capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-2000:]

    # both worker nodes hold a worker; one dies once a checkpoint is registered
    wait_for(lambda: world_sizes(run_dir)[:1] == [2] and registered_checkpoint_steps(run_dir), 300,
             "a checkpoint of the 2-worker run")
    lost_at = time.monotonic()
    cluster.lose_node(LOST_NODE)
    # the run goes on with the worker that is left (from its last checkpoint), without waiting for the node
    wait_for(lambda: 1 in world_sizes(run_dir), 240, "the run to continue on 1 worker")
    shrunk_after_s = time.monotonic() - lost_at
    shrink = records(run_dir, "world_size")[-1]
    assert shrink["world_size"] == 1 and shrink["resized"] and shrink["from_world_size"] == 2, shrink
    # the node returns once the 1-worker run has a checkpoint of its own: growing back restarts
    # from the newest registered checkpoint, and one from before the loss would undo the 1-worker
    # steps (the grow would then be from 2 workers; CI saw it on a loaded machine)
    wait_for(lambda: any(step > shrink["step"] for step in registered_checkpoint_steps(run_dir)), 180,
             "a checkpoint of the 1-worker run")

    cluster.start_node(LOST_NODE)  # capacity returns: a replacement node joins
    wait_for(lambda: world_sizes(run_dir)[-1:] == [2], 240, "the run to grow back to 2 workers")
    wait_for(lambda: job_succeeded(cluster, "job-elastic"), 300, "the job to finish")

    # each world size in order, and what it meant for the batch: 2 per worker, lr fixed
    starts = records(run_dir, "world_size")
    sizes = [r["world_size"] for r in starts]
    assert [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]] == [2, 1, 2], starts
    for r in starts:
        assert r["global_batch"] == 2 * r["world_size"] and r["batch_per_worker"] == 2, r
        assert r["lr_rule"] == "fixed" and r["workers_range"] == [1, 2], r
    grow = next(r for r in starts if r["resized"] and r["world_size"] == 2)
    assert grow["from_world_size"] == 1 and grow["step"] >= shrink["step"], starts
    # every step once, though the workers restarted twice from checkpoints
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, steps + 1))
    assert records(run_dir, "final")[-1]["step"] == steps
    # the 1-worker starts ran on the node that was left; the others on both
    alone = [r["workers"] for r in records(run_dir, "workers") if len(r["workers"]) == 1]
    assert alone and {w["host"] for workers in alone for w in workers} == {cluster.net.nodes[1].name}, alone
    # the run's own lines about it, for whoever tunes the timings above (-s shows them)
    logs = cluster.ray("job", "logs", "job-elastic").stdout.splitlines()
    print(f"continued on 1 worker {shrunk_after_s:.0f} s after the node was lost:",
          *[line[-200:] for line in logs if "resized from" in line], sep="\n  ")
