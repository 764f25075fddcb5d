"""DeepSpeed uses the worker's own device (Ray Train's get_device()), not LOCAL_RANK: Ray
sorts CUDA_VISIBLE_DEVICES as strings, so on a node with more than 10 GPUs the rank with
LOCAL_RANK 2 may hold cuda:10, and set_device(LOCAL_RANK) would put two ranks on one GPU."""
from __future__ import annotations

import os

import pytest
import torch

from .engine_helpers import tiny_config


class Initialized(Exception):
    """Raised by the stand-in for deepspeed.initialize, once its arguments are recorded."""


@pytest.fixture
def gpu_10_of_local_rank_2(monkeypatch):
    """A worker with LOCAL_RANK=2 whose device is cuda:10; records torch.cuda.set_device."""
    monkeypatch.setenv("LOCAL_RANK", "2")
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_deepspeed_gets_the_index_of_our_device(gpu_10_of_local_rank_2):
    from ddetr_dist.engine.deepspeed_config import bind_deepspeed_to

    args = bind_deepspeed_to(torch.device("cuda", 10))
    assert args.device_rank == 10  # what DeepSpeed's engine reads before LOCAL_RANK
    assert os.environ["LOCAL_RANK"] == "10"  # what ZeRO-3's zero.Init reads
    assert gpu_10_of_local_rank_2 == [10]


def test_nothing_changes_on_cpu(gpu_10_of_local_rank_2):
    from ddetr_dist.engine.deepspeed_config import bind_deepspeed_to

    assert bind_deepspeed_to(torch.device("cpu")) is None
    assert os.environ["LOCAL_RANK"] == "2" and gpu_10_of_local_rank_2 == []


def test_the_trainer_passes_its_device_to_deepspeed(monkeypatch, tmp_path, tiny_data, gpu_10_of_local_rank_2):
    import deepspeed

    from ddetr_dist.engine.checkpointers import FolderCheckpointer
    from ddetr_dist.engine.loop import Trainer
    from ddetr_dist.engine.run_dir import RunDir

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: self)  # no GPU here
    seen = {}

    def initialize(**kwargs):
        seen.update(kwargs)
        raise Initialized
    monkeypatch.setattr(deepspeed, "initialize", initialize)
    cfg = tiny_config(tiny_data, tmp_path, "data.val_shards=")
    with pytest.raises(Initialized):
        Trainer(cfg, tmp_path / "run", FolderCheckpointer(RunDir(tmp_path / "run")), device=torch.device("cuda", 10))
    assert getattr(seen.get("args"), "device_rank", None) == 10, seen.get("args")
