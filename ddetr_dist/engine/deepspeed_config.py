"""The DeepSpeed JSON, generated from the config tree (never kept by hand); the run
directory gets a copy for inspection (`deepspeed_config.json`).

Precision goes through DeepSpeed's torch autocast: parameters, gradients and optimizer
state stay fp32, matmuls/convolutions and the MSDA op run in bf16/fp16. The optimizer is
the torch AdamW we build (per-group learning rates), and there is no DeepSpeed scheduler:
it would overwrite those rates.

fp16 runs with ZeRO-0 only: under ZeRO-1/2/3, DeepSpeed 0.19's optimizer skips an
overflowing step without ever lowering the torch loss scale (so every later step is
skipped too) and clips the still-scaled gradients. The loop runs the loss scale itself for
ZeRO-0 (engine/step.py)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from ddetr_dist.atomic import atomic_write_bytes
from ddetr_dist.config import Config, ConfigError

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def check_precision(cfg: Config) -> None:
    t = cfg.train
    if t.precision == "fp16" and t.zero_stage > 0:
        raise ConfigError(f"config keys 'train.precision' (fp16) and 'train.zero_stage' ({t.zero_stage}): fp16 runs "
                          "with ZeRO-0 only (DeepSpeed's ZeRO optimizer never lowers the fp16 loss scale after an "
                          "overflow, so it would skip every step). Use train.precision=bf16 with ZeRO, or "
                          "train.zero_stage=0 with fp16.")
    if t.precision == "fp16" and not (0 <= t.loss_scale_power <= 32 and t.loss_scale_window >= 1):
        raise ConfigError(f"config keys 'train.loss_scale_power' ({t.loss_scale_power}, 0..32) and "
                          f"'train.loss_scale_window' ({t.loss_scale_window}, >= 1) are out of range")


def engine_stage(zero_stage: int, world_size: int) -> int:
    """The ZeRO stage the DeepSpeed engine runs at, for `train.zero_stage` on `world_size`
    ranks: the same, except ZeRO-1/2 on one rank, which run as ZeRO-0 (nothing to partition;
    see above). A checkpoint is the same either way (engine/portable.py), so runs of either
    kind resume each other. ZeRO-3 stays ZeRO-3: it also partitions the parameters, which
    evaluation and checkpoints gather collectively."""
    return 0 if world_size == 1 and zero_stage in (1, 2) else zero_stage


def _engine_zero_stage(cfg: Config, world_size: int) -> int:
    """engine_stage for `cfg`, said once at INFO when it is not the stage asked for (the
    Trainer builds the DeepSpeed config once per start)."""
    stage = engine_stage(cfg.train.zero_stage, world_size)
    if stage != cfg.train.zero_stage:
        log.info("train.zero_stage=%d on one rank: the DeepSpeed engine runs as ZeRO-%d (one rank has nothing to "
                 "partition; ZeRO's partition bookkeeping would only copy every gradient and weight each step). "
                 "Checkpoints are the same and resume at any world size and stage.", cfg.train.zero_stage, stage)
    return stage


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """Raises ConfigError for what DeepSpeed cannot run (before any worker starts: the
    driver generates it for the run directory). Its stage is `engine_stage`'s."""
    check_precision(cfg)  # on train.zero_stage: what the user asked must be valid at every world size
    t = cfg.train
    stage = _engine_zero_stage(cfg, world_size)
    zero: dict = {"stage": stage}
    if stage == 3:
        # our model is small per layer: keep every parameter partitioned, and never gather
        # a 16-bit copy on save (the world-size-free checkpoint gathers fp32 itself)
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": False})
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * world_size,
        # ZeRO-0: the loop clips, with the one fused norm it also logs (engine/step.py)
        "gradient_clipping": cfg.optim.clip_max_norm if stage > 0 else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW with our parameter groups
        "steps_per_print": 10 ** 9,  # we log; DeepSpeed's own step prints would interleave
        "wall_clock_breakdown": False,
    }
    if t.precision in AUTOCAST_DTYPES:
        config["torch_autocast"] = {"enabled": True, "dtype": AUTOCAST_DTYPES[t.precision]}
    return config


def save_deepspeed_config(config: dict, path: Path) -> None:
    """The run directory's copy of the JSON the workers run with (rank 0 writes it at each
    start: with a range of workers, its train_batch_size follows the world size)."""
    atomic_write_bytes(path, json.dumps(config, indent=1).encode())


def import_deepspeed():
    """DeepSpeed, told that it runs on CPUs when there is no GPU, rather than have it warn
    that it guessed (it reads DS_ACCELERATOR once, at its first import)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def bind_deepspeed_to(device: torch.device) -> SimpleNamespace | None:
    """Make DeepSpeed use `device`, this worker's GPU as Ray Train chose it; -> the `args`
    for deepspeed.initialize (None on CPU: nothing to choose).

    Ray Train picks the GPU by its position in CUDA_VISIBLE_DEVICES, which Ray sorts as
    strings ("0,1,10,11,2,...") while LOCAL_RANK counts as integers: with more than 10 GPUs
    per node, DeepSpeed's set_device(LOCAL_RANK) would put two ranks on one GPU. So the
    device is the one source: the engine reads args.device_rank before LOCAL_RANK
    (DeepSpeed 0.19, `_set_distributed_vars`), and ZeRO-3's zero.Init and its rank checks
    read the LOCAL_RANK variable itself, so that is set to the device's index too."""
    if device.type != "cuda":
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    torch.cuda.set_device(index)
    if os.environ.get("LOCAL_RANK") != str(index):
        log.info("LOCAL_RANK %s -> %d for DeepSpeed: the index of this worker's GPU (cuda:%d)",
                 os.environ.get("LOCAL_RANK"), index, index)
        os.environ["LOCAL_RANK"] = str(index)
    return SimpleNamespace(device_rank=index)
