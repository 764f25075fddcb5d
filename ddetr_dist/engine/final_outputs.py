"""How a run ends (`finish_run`), and what a finished run leaves besides its checkpoints: the
consolidated model, which loads into the official code, and a summary whose presence says
the run finished."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ddetr_dist import comm
from ddetr_dist.atomic import atomic_open, atomic_write_bytes
from ddetr_dist.config import Config, pad_multiple
from ddetr_dist.engine import train_state
from ddetr_dist.engine.metrics import MetricsLog
from ddetr_dist.engine.portable import portable_state
from ddetr_dist.engine.train_state import Progress
from ddetr_dist.models.build import variant_of
from ddetr_dist.engine.tensorboard import flat_hparams
from ddetr_dist.models.convert import METADATA_KEY, TRAINED_PADDING_KEY

if TYPE_CHECKING:
    from ddetr_dist.engine.loop import Trainer

log = logging.getLogger("ddetr_dist.train")


def finish_run(t: "Trainer") -> None:
    """The last evaluation and checkpoint (unless done at this step), model_final.pth,
    final_metrics.json, TensorBoard's hparams, and (object storage) the store's copy."""
    p, final = t.progress, {}
    t.checkpoint_writes.wait()  # a pending save completes before an evaluation or a report
    if t.eval_hook.enabled and not t.eval_hook.done_at(p.step):
        final = t.eval_hook(p.step, p.epoch)
    if t.checkpoints.at_finish(p.step):
        t.save_checkpoint(final)
    elif final:
        t.checkpointer.report({"step": p.step, "epoch": p.epoch, **final})
    t.checkpoint_writes.wait()  # the last checkpoint complete and registered before model_final.pth
    write_final_model(t.run_dir.final_model, t.engine, t.optimizer, t.cfg, p, t.metrics, t.loader.skips.total,
                      shown=t.run_dir.uri_of(t.run_dir.final_model))
    if t.rank == 0:
        write_final_metrics(t.run_dir.final_metrics, p, final)
    if t.tensorboard is not None:
        t.tensorboard.add_hparams(flat_hparams(t.cfg), final or {"step": p.step})
        t.tensorboard.close()
        log.info("TensorBoard: tensorboard --logdir %s", t.run_dir.uri_of(t.tensorboard.log_dir))
    if t.run_store is not None:  # last: final_metrics.json says the run finished
        t.run_store.push()


def write_final_model(path: Path, engine, optimizer, cfg: Config, progress: Progress, metrics: MetricsLog,
                      skipped_samples: int, shown: str | None = None) -> None:
    """The fp32 model as {'model': state_dict} with the official names (plus our model config
    and the padding its batches trained with, which the official code ignores). Collective
    (ZeRO gathers the parameters); rank 0 writes. `shown`: its name in the log (a run in
    object storage: its URI)."""
    train_state.average_batchnorm_statistics(engine.module)
    portable = portable_state(engine, optimizer)
    if comm.get_rank() == 0:
        out = {"model": portable["model"],
               METADATA_KEY: {"variant": variant_of(cfg.model), "config": dataclasses.asdict(cfg.model),
                              "step": progress.step, TRAINED_PADDING_KEY: pad_multiple(cfg)}}
        with atomic_open(path) as f:
            torch.save(out, f)
        metrics.emit({"event": "final", "step": progress.step, "epoch": progress.epoch,
                      "model_final": shown or str(path), "skipped_steps": progress.skipped_steps,
                      "skipped_samples": skipped_samples})
    comm.barrier()


def write_final_metrics(path: Path, progress: Progress, evaluation: dict) -> None:
    """(Rank 0.) Where the run ended, its skips and its last evaluation."""
    p = progress
    summary = {"step": p.step, "epoch": p.epoch, "skipped_steps": p.skipped_steps,
               "overflow_steps": p.overflow_steps, "samples_seen": p.samples_seen, "eval": evaluation}
    atomic_write_bytes(path, json.dumps(summary, indent=1).encode())
