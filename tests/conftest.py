import os

import pytest

# Every collective of every process the tests start (spawned ranks, Ray workers, `ddetr
# train` subprocesses inherit the environment) checks its tensors' device: NCCL's rule,
# with a stand-in on CPUs (ddetr_dist.comm). Set before anything imports comm.
os.environ["DDETR_CHECK_COLLECTIVES"] = "1"

from ddetr_dist.data import demo  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """32 train / 8 val demo images in shards of 8."""
    out = tmp_path_factory.mktemp("tiny_demo")
    demo.generate(out, train=32, val=8, seed=1, images_per_shard=8, workers=1, progress=False)
    return out
