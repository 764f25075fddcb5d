"""The train loop of one worker: a DeepSpeed engine around the detector, this rank's split
of the train shards, checkpoints through a `Checkpointer` (Ray's, or a folder of the run
directory without Ray), and metrics through `MetricsLog`.

It knows nothing of Ray: `ddetr_dist.on_ray.worker` runs it inside a Ray Train worker, the
benchmark in one plain process. Each optimizer step takes a window of `train.grad_accum`
batches through `WindowStep` (engine/step.py: forward, losses, backward and DeepSpeed's
step for each, and the rules for non-finite losses, gradients and fp16 overflows); here
the step is counted, logged and checkpointed, and `train.max_bad_steps` bad steps in a row
abort the run with advice.

Run-level decisions that precede a collective (resume from which checkpoint and how,
evaluate or not) are taken on rank 0 and broadcast: ranks reading files on their own can
disagree (NFS) and leave one waiting in a collective the others skipped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from itertools import islice
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ddetr_dist.atomic import atomic_open, atomic_write_bytes
from ddetr_dist.config import Config
from ddetr_dist.data import build_train_loader
from ddetr_dist import comm
from ddetr_dist.engine import train_state
from ddetr_dist.engine.checkpointers import Checkpointer
from ddetr_dist.engine.eval_hook import EvalHook
from ddetr_dist.engine.metrics import MetricsLog, memory_usage
from ddetr_dist.engine.optim import build_optimizer, set_learning_rates
from ddetr_dist.engine.tensorboard import TensorBoardSink, flat_hparams
from ddetr_dist.engine.step import StepResult, StepTimes, WindowStep, install_loss_scaler
from ddetr_dist.engine.train_state import Progress
from ddetr_dist.errors import NotRetryable
from ddetr_dist.models import build_model
from ddetr_dist.models.build import variant_of
from ddetr_dist.models.convert import METADATA_KEY

log = logging.getLogger("ddetr_dist.train")
CHECKPOINT_REQUEST = "CHECKPOINT_NOW"  # a file whose presence asks for a checkpoint at the next step
FINAL_MODEL = "model_final.pth"
FINAL_METRICS = "final_metrics.json"
# Fault injection for tests: "STEP[,STEP...][@RANK]" makes the loss non-finite at those
# optimizer steps (0-based) on RANK (default: every rank); the overflow variant multiplies
# the loss by 2**100 at those steps, which overflows fp16 gradients at any loss scale > 1.
INJECT_NONFINITE_ENV = "DDETR_INJECT_NONFINITE_LOSS"
INJECT_OVERFLOW_ENV = "DDETR_INJECT_FP16_OVERFLOW"


class NonFiniteLossError(NotRetryable):
    """Too many consecutive steps had a non-finite loss or gradient."""


# tqdm-like: called with total=, initial=, desc=; has update(n), set_description(text), close()
ProgressBar = Callable[..., object]


def _injected_steps(env: str) -> set[int]:
    spec = os.environ.get(env, "")
    if not spec:
        return set()
    steps, _, rank = spec.partition("@")
    if rank and int(rank) != comm.get_rank():
        return set()
    return {int(s) for s in steps.split(",") if s}


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


class Trainer:
    """One worker's training: `Trainer(cfg, run_dir, checkpointer).fit()`."""

    def __init__(self, cfg: Config, run_dir: Path, checkpointer: Checkpointer, device: torch.device | None = None,
                 progress_bar: ProgressBar | None = None):
        if not torch.cuda.is_available():  # say so, rather than have DeepSpeed warn that it guessed
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed  # the engine's dependency, not the model's

        from ddetr_dist.engine.deepspeed_config import bind_deepspeed_to, deepspeed_config

        self.cfg, self.run_dir, self.checkpointer = cfg, Path(run_dir), checkpointer
        self.device = device or torch.device("cpu")
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()
        self.metrics = MetricsLog(self.run_dir, enabled=self.rank == 0)
        self.progress_bar = progress_bar  # None: log lines only
        self.nonfinite_at = _injected_steps(INJECT_NONFINITE_ENV)
        self.overflow_at = _injected_steps(INJECT_OVERFLOW_ENV)
        self._last_saved_step: int | None = None
        self.lrs: dict[str, float] = {}
        self.last_step = StepResult(applied=False)
        self.ds_config = deepspeed_config(cfg, self.world_size)  # refuses what DeepSpeed cannot do

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model, self.criterion, self.postprocess = build_model(cfg)
        # from here on each rank draws its own numbers (dropout masks): seed + rank, as the
        # official code does; DeepSpeed broadcasts rank 0's weights anyway
        _seed_everything(cfg.seed + self.rank)
        self.loader = build_train_loader(cfg.data, seed=cfg.seed, rank=self.rank, world_size=self.world_size,
                                         pin_memory=self.device.type == "cuda")
        self.batches_per_epoch = len(self.loader)
        self.steps_per_epoch = max(1, self.batches_per_epoch // cfg.train.grad_accum)
        self.total_steps = cfg.train.max_steps or cfg.optim.epochs * self.steps_per_epoch
        self.progress = Progress(world_size=self.world_size, zero_stage=cfg.train.zero_stage,
                                 batches_per_epoch=self.batches_per_epoch,
                                 data_order=train_state.data_order(cfg, self.loader.shards))

        with checkpointer.latest() as resume_dir:
            saved, changed = comm.decided_by_rank_0(lambda: self._plan_resume(resume_dir))
            portable = None
            if saved is not None and changed:
                portable = train_state.load_portable_model(resume_dir, model)
            model.to(self.device)
            self.optimizer = build_optimizer(model, cfg.optim, cfg.model)
            self.engine, *_ = deepspeed.initialize(args=bind_deepspeed_to(self.device), model=model,
                                                   optimizer=self.optimizer, config=self.ds_config,
                                                   dist_init_required=False)
            self.loss_scaler = install_loss_scaler(self.engine, self.device, cfg.train.loss_scale_power,
                                                   cfg.train.loss_scale_window) \
                if cfg.train.precision == "fp16" else None
            if saved is not None:
                self._resume(resume_dir, saved, changed, portable)
            else:  # a group restarted before any checkpoint was registered starts over: so does its log
                self.metrics.truncate_after(0)
        self.stepper = WindowStep(self.engine, self.criterion, self.device, cfg.train.zero_stage, self.loss_scaler)
        # after a resume, TensorBoard drops what was logged after the checkpoint (it is redone)
        self.tensorboard = TensorBoardSink(self.run_dir, purge_step=self.progress.step + 1) if self.rank == 0 else None
        if self.tensorboard is not None:
            self.metrics.sinks.append(self.tensorboard)
        self.eval_hook = EvalHook(self)

    # ------------------------------------------------------------------ resume

    def _plan_resume(self, resume_dir: Path | None) -> tuple[Progress | None, list[str]]:
        """(On rank 0.) The checkpoint's progress, after checking every rank's part is there,
        and what changed since in what decides the sample order ([] = resume exactly)."""
        if resume_dir is None:
            return None, []
        saved = Progress.read(resume_dir)
        train_state.check_complete(resume_dir, saved)
        return saved, train_state.order_changes(saved, self.progress)

    def _resume(self, resume_dir: Path, saved: Progress, changed: list[str], portable: dict | None) -> None:
        k = self.cfg.train.grad_accum
        if not changed:
            train_state.restore(resume_dir, self.engine, saved)
            batches_in_epoch = saved.batches_in_epoch
        else:
            train_state.load_portable_optimizer(portable, self.engine, self.optimizer, self.cfg.train.zero_stage)
            # the data order of the old run cannot be replayed: continue the epoch at the same
            # fraction, on a step boundary
            fraction = saved.batches_in_epoch / (saved.batches_per_epoch or
                                                 self.batches_per_epoch * self.world_size / saved.world_size)
            batches_in_epoch = min(k * int(fraction * self.batches_per_epoch / k), self.batches_per_step_epoch)
            log.warning("resuming %s from its world-size-free form, not exactly: %s changed; the order of the "
                        "samples in the rest of epoch %d differs from the old run's", resume_dir, "; ".join(changed),
                        saved.epoch)
        if self.loss_scaler is not None and saved.loss_scaler:
            self.loss_scaler.load_state_dict(saved.loss_scaler)
        self.progress = dataclasses.replace(
            self.progress, step=saved.step, epoch=saved.epoch, batches_in_epoch=batches_in_epoch,
            skipped_steps=saved.skipped_steps, overflow_steps=saved.overflow_steps,
            bad_steps_in_a_row=saved.bad_steps_in_a_row, samples_seen=saved.samples_seen)
        self.metrics.truncate_after(saved.step)
        self.metrics.emit({"event": "resume", "step": saved.step, "epoch": saved.epoch, "from": str(resume_dir),
                           "exact": not changed, "changed": changed, "from_world_size": saved.world_size})

    # ------------------------------------------------------------------ the loop

    def fit(self) -> Progress:
        """Train to `train.max_steps` (or `optim.epochs`), checkpointing at each epoch end
        and every `train.checkpoint_every_steps`; then write model_final.pth."""
        p = self.progress
        self.engine.train()
        while p.step < self.total_steps:
            self.loader.set_epoch(p.epoch, skip_batches=p.batches_in_epoch)
            self._train_epoch()
            if p.batches_in_epoch >= self.batches_per_step_epoch:
                self._end_epoch()
        final = {}
        if self.eval_hook.enabled and not self.eval_hook.done_at(self, p.step):
            final = self.eval_hook(self)
        if not self._saved_at(p.step):
            self.save_checkpoint(final)
        elif final:
            self.checkpointer.report({"step": p.step, "epoch": p.epoch, **final})
        self.save_final_model()
        if self.rank == 0:
            summary = {"step": p.step, "epoch": p.epoch, "skipped_steps": p.skipped_steps,
                       "overflow_steps": p.overflow_steps, "samples_seen": p.samples_seen, "eval": final}
            atomic_write_bytes(self.run_dir / FINAL_METRICS, json.dumps(summary, indent=1).encode())
        if self.tensorboard is not None:
            self.tensorboard.add_hparams(flat_hparams(self.cfg), final or {"step": p.step})
            self.tensorboard.close()
            log.info("TensorBoard: tensorboard --logdir %s", self.tensorboard.log_dir)
        return p

    @property
    def batches_per_step_epoch(self) -> int:
        """Batches of this rank an epoch uses (whole optimizer steps)."""
        return self.steps_per_epoch * self.cfg.train.grad_accum

    def _train_epoch(self) -> None:
        """Until the epoch's batches are used or the run's steps are done."""
        p = self.progress
        bar = self.progress_bar(total=self.batches_per_step_epoch, initial=p.batches_in_epoch,
                                desc=f"epoch {p.epoch}") if self.rank == 0 and self.progress_bar else None
        epoch = StepTimes()
        try:
            self._run_steps(bar, epoch)
        finally:
            if bar is not None:
                bar.close()
        if self.rank == 0 and epoch.micro_steps:
            log.info("epoch %d: %d steps, loss %.4f, %.1f images/s, %.0f s, data wait %.0f%%, skipped steps %d",
                     p.epoch, epoch.optimizer_steps, epoch.losses["loss"] / epoch.micro_steps,
                     epoch.images * self.world_size / max(epoch.total, 1e-9), epoch.total,
                     100 * epoch.data / max(epoch.total, 1e-9), p.skipped_steps)

    def _run_steps(self, bar, epoch: StepTimes) -> None:
        p, t = self.progress, self.cfg.train
        times = StepTimes()
        batches = iter(self.loader)
        while p.step < self.total_steps and p.batches_in_epoch < self.batches_per_step_epoch:
            tick = time.perf_counter()
            window = list(islice(batches, t.grad_accum))
            times.data += time.perf_counter() - tick
            if len(window) < t.grad_accum:
                break  # the loader ended early (it yields whole epochs of whole steps)
            self._optimizer_step(window, times)
            p.batches_in_epoch += len(window)
            if bar is not None:
                bar.update(len(window))
            if p.step % t.log_every_steps == 0 or p.step == self.total_steps:
                self._log(times, bar)
                epoch.add(times)
                times = StepTimes()
            at_end = p.step >= self.total_steps or p.batches_in_epoch >= self.batches_per_step_epoch
            if not at_end and ((t.checkpoint_every_steps and p.step % t.checkpoint_every_steps == 0)
                               or self._checkpoint_requested()):
                self.save_checkpoint({})
        epoch.add(times)

    def _window_num_boxes(self, window: list) -> float:
        """The loss normaliser of every micro-batch in the window: the mean number of target
        boxes per micro-batch over the window's micro-batches on all ranks."""
        boxes = sum(len(t["labels"]) for _, _, targets in window for t in targets)
        return comm.all_reduce_sum([boxes])[0] / (self.world_size * len(window))

    def _optimizer_step(self, window: list, times: StepTimes) -> None:
        p, t = self.progress, self.cfg.train
        self.lrs = set_learning_rates(self.optimizer, self.cfg.optim, p.step, p.epoch)
        result = self.stepper.run(window, self._window_num_boxes(window), times, p.step in self.nonfinite_at,
                                  loss_factor=2.0 ** 100 if p.step in self.overflow_at else 1.0)
        self.last_step = result
        p.step += 1
        p.samples_seen += self.cfg.data.batch_size * t.grad_accum * self.world_size
        if result.applied:
            p.bad_steps_in_a_row = 0
            return
        p.skipped_steps += 1
        if result.overflow:
            p.overflow_steps += 1
            log.info("step %d skipped: fp16 gradients overflowed; loss scale now %g", p.step - 1, result.loss_scale)
            self.metrics.emit({"event": "skipped_step", "step": p.step, "epoch": p.epoch, "reason": "fp16 overflow",
                               "loss_scale": result.loss_scale, "skipped_steps": p.skipped_steps})
            return
        p.bad_steps_in_a_row += 1
        log.warning("step %d skipped on every rank: non-finite loss or gradient (%d in a row, %d in all)",
                    p.step - 1, p.bad_steps_in_a_row, p.skipped_steps)
        self.metrics.emit({"event": "skipped_step", "step": p.step, "epoch": p.epoch, "reason": "non-finite",
                           "skipped_steps": p.skipped_steps})
        if p.bad_steps_in_a_row >= t.max_bad_steps:
            raise NonFiniteLossError(
                f"{p.bad_steps_in_a_row} steps in a row had a non-finite loss or gradient (train.max_bad_steps="
                f"{t.max_bad_steps}), last at step {p.step - 1}. Try a lower optim.lr, optim.warmup_steps > 0, "
                "optim.clip_max_norm > 0, train.precision=fp32 (bf16/fp16 overflow), and check the data "
                "(boxes of zero size, wrong category ids).")

    def _log(self, times: StepTimes, bar=None) -> None:
        p = self.progress
        if not times.micro_steps:  # every step since the last line was skipped (and logged as such)
            return
        n = times.micro_steps
        record = {"event": "train", "step": p.step, "epoch": p.epoch,
                  **{k: v / n for k, v in times.losses.items()},
                  "lr": self.lrs.get("rest", next(iter(self.lrs.values()))),
                  **{f"lr_{name}": lr for name, lr in self.lrs.items()},
                  "images_per_s": times.images * self.world_size / max(times.total, 1e-9),
                  "step_time": times.total / max(1, times.optimizer_steps),
                  "data_wait": times.data / max(times.total, 1e-9),
                  "time_forward": times.forward, "time_backward": times.backward, "time_optimizer": times.optimizer,
                  "time_allreduce": times.allreduce,
                  "skipped_steps": p.skipped_steps, "skipped_samples": self.loader.skips.total,
                  **memory_usage(self.device)}
        if self.last_step.grad_norm is not None:  # of the last step taken, unscaled, before clipping
            record["grad_norm"] = self.last_step.grad_norm
        if self.loss_scaler is not None:
            record.update(loss_scale=self.loss_scaler.get_scale(), overflow_steps=p.overflow_steps)
        weights = self.criterion.weight_dict
        record.update({f"{k}_weighted": record[k] * weights[k] for k in list(record) if k in weights})
        self.metrics.emit(record)
        if bar is not None:
            bar.set_description(f"epoch {p.epoch} loss {record['loss']:.3f} {record['images_per_s']:.1f} img/s")

    def _end_epoch(self) -> None:
        p = self.progress
        finished = p.epoch
        p.epoch, p.batches_in_epoch = p.epoch + 1, 0
        metrics = {"epoch_finished": finished}
        if self.eval_hook.due(self, finished):
            metrics.update(self.eval_hook(self))
        self.save_checkpoint(metrics)

    # ------------------------------------------------------------------ saving

    def _checkpoint_requested(self) -> bool:
        """Whether someone asked for a checkpoint now by creating CHECKPOINT_NOW in the run
        directory (the SLURM script does before a time limit or requeue; anyone may). Rank 0
        looks, every rank learns it in one all-reduce per step, and the request is consumed."""
        request = self.run_dir / CHECKPOINT_REQUEST
        requested = comm.any_rank(self.rank == 0 and request.exists())
        if requested and self.rank == 0:
            request.unlink(missing_ok=True)
            self.metrics.emit({"event": "checkpoint_requested", "step": self.progress.step,
                               "epoch": self.progress.epoch})
        return requested

    def _saved_at(self, step: int) -> bool:
        return self._last_saved_step == step

    def save_checkpoint(self, metrics: dict) -> None:
        p = self.progress
        p.loss_scaler = self.loss_scaler.state_dict() if self.loss_scaler is not None else None
        self.checkpointer.save(p.step, {"step": p.step, "epoch": p.epoch, **metrics},
                               lambda folder: train_state.save(folder, self.engine, self.optimizer, p))
        self._last_saved_step = p.step
        self.metrics.emit({"event": "checkpoint", "step": p.step, "epoch": p.epoch})

    def save_final_model(self) -> Path:
        """`model_final.pth`: the consolidated fp32 model as {'model': state_dict} with the
        official names (plus our config, which the official code ignores)."""
        train_state.average_batchnorm_statistics(self.engine.module)
        portable = train_state.portable_state(self.engine, self.optimizer, self.cfg.train.zero_stage)
        path = self.run_dir / FINAL_MODEL
        if self.rank == 0:
            out = {"model": portable["model"],
                   METADATA_KEY: {"variant": variant_of(self.cfg.model), "config": dataclasses.asdict(self.cfg.model),
                                  "step": self.progress.step}}
            with atomic_open(path) as f:
                torch.save(out, f)
            self.metrics.emit({"event": "final", "step": self.progress.step, "epoch": self.progress.epoch,
                               "model_final": str(path), "skipped_steps": self.progress.skipped_steps,
                               "skipped_samples": self.loader.skips.total})
        comm.barrier()
        return path
