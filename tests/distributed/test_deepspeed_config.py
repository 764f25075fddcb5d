"""The DeepSpeed JSON is generated from the config tree."""
import pytest

from ddetr_dist.config import ConfigError, load_config
from ddetr_dist.engine.deepspeed_config import deepspeed_config


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


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp16_with_zero_is_refused_naming_both_keys(stage):
    # DeepSpeed 0.19's ZeRO optimizer never lowers the torch loss scale: every step would be skipped
    cfg = load_config(None, ["train.precision=fp16", f"train.zero_stage={stage}"])
    with pytest.raises(ConfigError, match=r"'train.precision' \(fp16\) and 'train.zero_stage'.*bf16"):
        deepspeed_config(cfg, 1)
    deepspeed_config(load_config(None, ["train.precision=fp16", "train.zero_stage=0"]), 1)
