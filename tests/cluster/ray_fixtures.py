"""What the Ray cluster test modules share: a module's running cluster (`ray_cluster.py`,
with the tiny demo data on its shared mount, optionally an S3-compatible store on the test
network), the user's checkout that `launch/submit.sh` uploads, and whether a job succeeded."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from s3_server import S3Server
from test_shell_scripts import repository_files

from . import netns
from .ray_cluster import REPO, RayCluster

# The head notices a dead node by missed health checks: a few seconds here instead of Ray's
# ~30 s (what a node's loss costs a real run before it continues), to keep the tests short
FAST_HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                      "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@contextlib.contextmanager
def running_cluster(workdir: Path, tiny_data: Path, prefix: str, node_env: dict | None = None,
                    with_s3: bool = False) -> Iterator[RayCluster]:
    """A 3-node cluster in network namespaces named `prefix`; skipped (failed under CI) where
    namespaces cannot be made. `with_s3`: a real S3-compatible store on the network's host
    address (`cluster.s3`), every node started with its endpoint and keys (an instance role
    or a secret in the pod's environment on a real cluster)."""
    reason = netns.available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the cluster tests, but {reason}")
        pytest.skip(reason)
    shared = workdir / "shared"  # the NFS mount: data and runs
    shutil.copytree(tiny_data, shared / "data")
    with netns.Network(prefix, 3) as net, \
            (S3Server(workdir / "s3", host=net.host_address) if with_s3 else contextlib.nullcontext()) as s3:
        cluster = RayCluster(net, workdir, shared)
        cluster.node_env.update(node_env or {})
        if s3 is not None:
            cluster.node_env.update(s3.env)
        cluster.s3 = s3
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()


def user_checkout(root: Path) -> Path:
    """The user's copy of the code (what submit.sh uploads), without the venv."""
    for path in repository_files():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, root / path)
    return root


def job_succeeded(cluster: RayCluster, job_id: str) -> bool:
    """True once the job succeeded; its logs in an AssertionError once it failed or stopped."""
    out = cluster.ray("job", "status", job_id).stdout
    if f"Job '{job_id}' failed" in out or f"Job '{job_id}' was stopped" in out:
        raise AssertionError(cluster.ray("job", "logs", job_id).stdout[-6000:])
    return f"Job '{job_id}' succeeded" in out
