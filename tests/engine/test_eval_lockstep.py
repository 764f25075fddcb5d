"""Evaluation under ZeRO-3 runs in lockstep on every rank (each forward gathers the
partitioned parameters collectively); the engine's module says whether it is partitioned,
whatever stage the config asked for."""
from __future__ import annotations

import torch

from ddetr_dist.config import load_config
from ddetr_dist.engine.deepspeed_config import deepspeed_config, import_deepspeed
from ddetr_dist.engine.eval_hook import partitioned


def engine_module(zero_stage: int) -> torch.nn.Module:
    deepspeed = import_deepspeed()
    cfg = load_config(None, ["data.batch_size=1", f"train.zero_stage={zero_stage}"])
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config=deepspeed_config(cfg, world_size=1), dist_init_required=False)
    return engine.module


def test_only_a_zero3_engine_evaluates_in_lockstep(one_process):
    assert partitioned(engine_module(3))
    assert not partitioned(engine_module(2))  # one rank: runs as ZeRO-0
    assert not partitioned(torch.nn.Linear(2, 2))
