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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server on 127.0.0.1 (tests/s3_server.py), one per session."""
    from s3_server import S3Server

    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """This process set up as a user of that store: its endpoint and keys in the AWS
    variables, a fresh bucket, and a node-local staging folder of its own."""
    import secrets

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DDETR_STAGING_DIR", str(tmp_path / "staging"))
    bucket = f"b{secrets.token_hex(4)}"
    s3_server.make_bucket(bucket)
    return bucket
