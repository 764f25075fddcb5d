import pytest

from ddetr_dist.data import demo


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """32 train / 8 val demo images in shards of 8."""
    out = tmp_path_factory.mktemp("tiny_demo")
    demo.generate(out, train=32, val=8, seed=1, images_per_shard=8, workers=1, progress=False)
    return out
