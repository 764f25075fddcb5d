"""What a finished run leaves besides its checkpoints: the consolidated model, which loads
into the official code, and a summary whose presence says the run finished."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ddetr_dist import comm
from ddetr_dist.atomic import atomic_open, atomic_write_bytes
from ddetr_dist.config import Config
from ddetr_dist.engine import train_state
from ddetr_dist.engine.metrics import MetricsLog
from ddetr_dist.engine.train_state import Progress
from ddetr_dist.models.build import variant_of
from ddetr_dist.models.convert import METADATA_KEY


def write_final_model(path: Path, engine, optimizer, cfg: Config, progress: Progress, metrics: MetricsLog,
                      skipped_samples: int) -> None:
    """The fp32 model as {'model': state_dict} with the official names (plus our config,
    which the official code ignores). Collective (ZeRO gathers the parameters); rank 0
    writes."""
    train_state.average_batchnorm_statistics(engine.module)
    portable = train_state.portable_state(engine, optimizer, cfg.train.zero_stage)
    if comm.get_rank() == 0:
        out = {"model": portable["model"],
               METADATA_KEY: {"variant": variant_of(cfg.model), "config": dataclasses.asdict(cfg.model),
                              "step": progress.step}}
        with atomic_open(path) as f:
            torch.save(out, f)
        metrics.emit({"event": "final", "step": progress.step, "epoch": progress.epoch, "model_final": str(path),
                      "skipped_steps": progress.skipped_steps, "skipped_samples": skipped_samples})
    comm.barrier()


def write_final_metrics(path: Path, progress: Progress, evaluation: dict) -> None:
    """(Rank 0.) Where the run ended, its skips and its last evaluation."""
    p = progress
    summary = {"step": p.step, "epoch": p.epoch, "skipped_steps": p.skipped_steps,
               "overflow_steps": p.overflow_steps, "samples_seen": p.samples_seen, "eval": evaluation}
    atomic_write_bytes(path, json.dumps(summary, indent=1).encode())
