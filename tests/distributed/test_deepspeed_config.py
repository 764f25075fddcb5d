"""The DeepSpeed JSON is generated from the config tree."""
import logging

import pytest

from ddetr_dist.config import ConfigError, load_config
from ddetr_dist.engine.deepspeed_config import deepspeed_config, engine_stage


def test_batch_accumulation_clipping_and_stage_come_from_the_config():
    cfg = load_config(None, ["data.batch_size=3", "train.grad_accum=2", "train.zero_stage=2", "optim.clip_max_norm=0.5"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 2
    assert "optimizer" not in ds and "scheduler" not in ds  # ours: per-group learning rates
    assert "torch_autocast" not in ds  # fp32


def test_precision_is_torch_autocast_with_fp32_parameters():
    ds = deepspeed_config(load_config(None, ["train.precision=bf16"]), world_size=1)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in ds and "fp16" not in ds  # those would make the parameters 16-bit
    assert deepspeed_config(load_config(None, ["train.precision=fp16"]), 1)["torch_autocast"]["dtype"] == "float16"


def test_the_engine_runs_zero_1_and_2_as_stage_0_on_one_rank_only():
    assert [engine_stage(stage, world_size=1) for stage in range(4)] == [0, 0, 0, 3]
    assert [engine_stage(stage, world_size=2) for stage in range(4)] == [0, 1, 2, 3]


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_and_2_on_one_rank_build_a_stage_0_engine_that_the_loop_clips_and_say_why(stage, caplog):
    cfg = load_config(None, [f"train.zero_stage={stage}", "optim.clip_max_norm=0.5"])
    with caplog.at_level(logging.INFO, logger="ddetr_dist.engine.deepspeed_config"):
        ds = deepspeed_config(cfg, world_size=1)
    # stage 0: the loop clips (engine/step.py), DeepSpeed does not clip a second time
    assert ds["zero_optimization"] == {"stage": 0} and ds["gradient_clipping"] == 0.0
    assert cfg.train.zero_stage == stage  # what the user asked stays
    [record] = caplog.records
    assert record.levelno == logging.INFO and f"train.zero_stage={stage} on one rank" in record.getMessage()
    assert "nothing to partition" in record.getMessage()
    caplog.clear()
    two = deepspeed_config(cfg, world_size=2)
    assert two["zero_optimization"] == {"stage": stage} and two["gradient_clipping"] == 0.5
    assert caplog.records == []  # said only where the engine's stage differs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp16_with_zero_is_refused_naming_both_keys(stage):
    # DeepSpeed 0.19's ZeRO optimizer never lowers the torch loss scale: every step would be
    # skipped. Refused on the stage asked for, also on one rank (whose engine runs ZeRO-1/2 as
    # stage 0): the same config must not fail only once a run grows to 2 workers
    cfg = load_config(None, ["train.precision=fp16", f"train.zero_stage={stage}"])
    with pytest.raises(ConfigError, match=r"'train.precision' \(fp16\) and 'train.zero_stage'.*bf16"):
        deepspeed_config(cfg, 1)
    deepspeed_config(load_config(None, ["train.precision=fp16", "train.zero_stage=0"]), 1)
