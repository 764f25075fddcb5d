"""Run the engine's Trainer in N plain processes (gloo, no Ray) for tests: fast enough to
compare ZeRO stages, resumes and resizes bitwise."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TINY_OVERRIDES = [
    "model.backbone_depth=18", "model.hidden_dim=32", "model.nheads=2", "model.enc_layers=1",
    "model.dec_layers=2", "model.dim_feedforward=32", "model.num_queries=8", "model.num_feature_levels=2",
    "model.num_classes=7", "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=8",
    "data.train_scales=[96]", "data.crop_scales=[64]", "data.crop_min_size=48", "data.crop_max_size=64",
    "data.val_scale=96", "data.max_size=128", "train.log_every_steps=1", "optim.lr=1e-3",
    "optim.lr_backbone=1e-4",
]
# `ddetr train` refuses a random backbone with frozen BatchNorm/stages (TINY_OVERRIDES's
# defaults, which the engine tests keep: batch statistics would tie a step to its batch
# size): runs through the driver train it from scratch
FROM_SCRATCH = ["model.backbone_norm=bn", "model.backbone_frozen_stages=0"]


def tiny_config(data_dir: Path, out_dir: Path, *overrides: str):
    from ddetr_dist.config import load_config

    return load_config(None, TINY_OVERRIDES + [
        f"data.train_shards={data_dir / 'train' / 'shards'}", f"data.val_shards={data_dir / 'val' / 'shards'}",
        f"output_dir={out_dir}", *overrides])


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 96, 128, generator=generator)
    padding_mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    padding_mask[1, :, 100:] = True
    return images, padding_mask


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg, run_dir: str, result_file: str, env: dict):
    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from ddetr_dist.engine.checkpointers import FolderCheckpointer
        from ddetr_dist.engine.loop import Trainer
        from ddetr_dist.engine.portable import portable_state
        from ddetr_dist.engine.run_dir import RunDir

        trainer = Trainer(cfg, RunDir(run_dir), FolderCheckpointer(RunDir(run_dir)))
        trainer.fit()
        # collective under ZeRO-3 (parameters are partitioned): every rank takes part
        full = portable_state(trainer.engine, trainer.optimizer)
        with torch.no_grad():  # a fixed input, to compare model_final.pth's outputs with
            outputs = trainer.engine.module.eval()(*fixed_batch())
        if rank == 0:
            params = {n: full["model"][n] for n, _ in trainer.engine.module.named_parameters()}
            torch.save({"params": params, "progress": trainer.progress.__dict__,
                        "pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}, result_file)
    finally:
        dist.destroy_process_group()


def run_trainer(cfg, world: int, run_dir: Path, env: dict | None = None) -> dict:
    """Train `cfg` in `world` processes into `run_dir`; -> rank 0's final parameters and progress."""
    run_dir.mkdir(parents=True, exist_ok=True)
    result = run_dir / f"result-{os.getpid()}.pt"
    mp.start_processes(_worker, args=(world, free_port(), cfg, str(run_dir), str(result), env or {}),
                       nprocs=world, join=True, start_method="spawn")
    out = torch.load(result, weights_only=False)
    result.unlink()
    return out


def _eval_worker(rank: int, world: int, port: int, cfg, out_dir: str):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from ddetr_dist.engine.evaluate import evaluate
        from ddetr_dist.models import build_model

        torch.manual_seed(0)  # the same (untrained) weights everywhere: detections still differ per image
        model, criterion, postprocess = build_model(cfg)
        evaluate(model, criterion, postprocess, cfg, torch.device("cpu"), Path(out_dir), progress=False)
    finally:
        dist.destroy_process_group()


def run_evaluation(cfg, world: int, out_dir: Path) -> dict:
    """`evaluate` in `world` gloo processes; -> rank 0's detections and metrics."""
    mp.start_processes(_eval_worker, args=(world, free_port(), cfg, str(out_dir)), nprocs=world, join=True,
                       start_method="spawn")
    return {"detections": json.loads((out_dir / "detections.json").read_text()),
            "metrics": json.loads((out_dir / "metrics.json").read_text())["metrics"]}


def _rank_worker(rank: int, world: int, port: int, fn, args: tuple, result_dir: str):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, *args), Path(result_dir) / f"rank_{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world: int, *args, tmp: Path) -> list:
    """`fn(rank, *args)` in `world` gloo processes (fn must be importable: a module-level
    function of a test module); -> each rank's return value, in rank order."""
    tmp.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_rank_worker, args=(world, free_port(), fn, args, str(tmp)), nprocs=world, join=True,
                       start_method="spawn")
    return [torch.load(tmp / f"rank_{r}.pt", weights_only=False) for r in range(world)]
