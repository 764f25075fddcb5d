"""The train loop of one worker: a DeepSpeed engine around the detector, this rank's split
of the train shards, checkpoints through a `Checkpointer` (Ray's, or a folder of the run
directory without Ray), and metrics through `MetricsLog`.

It knows nothing of Ray: `ddetr_dist.dist.worker` runs it inside a Ray Train worker, the
benchmark in one plain process. Each step:

    batch -> forward (autocast) -> losses -> all ranks agree the loss is finite
          -> engine.backward -> (at the accumulation boundary) gradients finite? -> engine.step

A non-finite loss or gradient on any rank skips the step on all ranks (an all-reduce
decides, so no rank waits in a collective the others skipped); `train.max_bad_steps` in a
row abort the run with advice.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ddetr_dist.atomic import atomic_open, atomic_write_bytes
from ddetr_dist.config import Config
from ddetr_dist.data import build_train_loader
from ddetr_dist.dist import comm
from ddetr_dist.engine import train_state
from ddetr_dist.engine.checkpointers import Checkpointer
from ddetr_dist.engine.eval_hook import EvalHook
from ddetr_dist.engine.evaluate import outputs_to_float
from ddetr_dist.engine.metrics import MetricsLog, memory_usage
from ddetr_dist.engine.optim import build_optimizer, set_learning_rates
from ddetr_dist.engine.tensorboard import TensorBoardSink, flat_hparams
from ddetr_dist.engine.train_state import Progress
from ddetr_dist.models import build_model
from ddetr_dist.models.build import variant_of
from ddetr_dist.models.convert import METADATA_KEY

log = logging.getLogger("ddetr_dist.train")
CHECKPOINT_REQUEST = "CHECKPOINT_NOW"  # a file whose presence asks for a checkpoint at the next step
FINAL_MODEL = "model_final.pth"
FINAL_METRICS = "final_metrics.json"
# Fault injection for tests: "STEP[,STEP...][@RANK]" makes the loss non-finite at those
# optimizer steps (0-based) on RANK (default: every rank).
INJECT_NONFINITE_ENV = "DDETR_INJECT_NONFINITE_LOSS"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


# tqdm-like: called with total=, initial=, desc=; has update(n), set_description(text), close()
ProgressBar = Callable[..., object]


@dataclass
class StepTimes:
    """Seconds spent in each phase since the last log line (this rank)."""

    data: float = 0.0
    forward: float = 0.0
    backward: float = 0.0  # includes the gradient all-reduce
    optimizer: float = 0.0
    allreduce: float = 0.0  # DeepSpeed's gradient reduction at the boundary (a part of backward)
    images: int = 0
    micro_steps: int = 0  # with a finite loss
    optimizer_steps: int = 0
    losses: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.data + self.forward + self.backward + self.optimizer

    def add(self, other: "StepTimes") -> None:
        for name in ("data", "forward", "backward", "optimizer", "allreduce", "images", "micro_steps",
                     "optimizer_steps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for key, value in other.losses.items():
            self.losses[key] = self.losses.get(key, 0.0) + value


def _injected_nonfinite_steps() -> set[int]:
    spec = os.environ.get(INJECT_NONFINITE_ENV, "")
    if not spec:
        return set()
    steps, _, rank = spec.partition("@")
    if rank and int(rank) != comm.get_rank():
        return set()
    return {int(s) for s in steps.split(",") if s}


def _grad_norm(module: torch.nn.Module) -> float:
    """The global L2 norm of the (already all-reduced) gradients: NaN/inf if any is."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


class Trainer:
    """One worker's training: `Trainer(cfg, run_dir, checkpointer).fit()`."""

    def __init__(self, cfg: Config, run_dir: Path, checkpointer: Checkpointer, device: torch.device | None = None,
                 progress_bar: ProgressBar | None = None):
        if not torch.cuda.is_available():  # say so, rather than have DeepSpeed warn that it guessed
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed  # the engine's dependency, not the model's

        from ddetr_dist.dist.deepspeed_config import deepspeed_config

        self.cfg, self.run_dir, self.checkpointer = cfg, Path(run_dir), checkpointer
        self.device = device or torch.device("cpu")
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()
        self.metrics = MetricsLog(self.run_dir, enabled=self.rank == 0)
        self.progress_bar = progress_bar  # None: log lines only
        self.progress = Progress(world_size=self.world_size, zero_stage=cfg.train.zero_stage)
        self.nonfinite_at = _injected_nonfinite_steps()
        self._step_bad = False  # a micro-step of the current optimizer step had a non-finite loss
        self._last_saved_step: int | None = None
        self.lrs: dict[str, float] = {}
        self.grad_norm: float | None = None  # of the last step (DeepSpeed's, before clipping)

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model, self.criterion, self.postprocess = build_model(cfg)
        self.loader = build_train_loader(cfg.data, seed=cfg.seed, rank=self.rank, world_size=self.world_size,
                                         pin_memory=self.device.type == "cuda")
        self.batches_per_epoch = len(self.loader)
        self.steps_per_epoch = max(1, self.batches_per_epoch // cfg.train.grad_accum)
        self.total_steps = cfg.train.max_steps or cfg.optim.epochs * self.steps_per_epoch

        with checkpointer.latest() as resume_dir:
            portable = None
            if resume_dir is not None:
                saved = Progress.read(resume_dir)
                train_state.check_complete(resume_dir, saved)
                exact = train_state.can_resume_exactly(saved, self.world_size, cfg.train.zero_stage)
                if not exact:
                    portable = train_state.load_portable_model(resume_dir, model)
            model.to(self.device)
            self.optimizer = build_optimizer(model, cfg.optim, cfg.model)
            self.ds_config = deepspeed_config(cfg, self.world_size)
            self.engine, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config,
                                                   dist_init_required=False)
            if resume_dir is not None:
                self._resume(resume_dir, saved, exact, portable)
            else:  # a group restarted before any checkpoint was registered starts over: so does its log
                self.metrics.truncate_after(0)
        self._time_allreduce()
        # after a resume, TensorBoard drops what was logged after the checkpoint (it is redone)
        self.tensorboard = TensorBoardSink(self.run_dir, purge_step=self.progress.step + 1) if self.rank == 0 else None
        if self.tensorboard is not None:
            self.metrics.sinks.append(self.tensorboard)
        self.eval_hook = EvalHook(self)

    def _time_allreduce(self) -> None:
        """Wrap DeepSpeed's boundary gradient reduction to time it (one clock read each)."""
        reduce = self.engine.allreduce_gradients
        self._allreduce_s = 0.0

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return reduce(*args, **kwargs)
            finally:
                self._allreduce_s += time.perf_counter() - start

        self.engine.allreduce_gradients = timed

    # ------------------------------------------------------------------ resume

    def _resume(self, resume_dir: Path, saved: Progress, exact: bool, portable: dict | None) -> None:
        if exact:
            train_state.restore(resume_dir, self.engine, saved)
            batches_in_epoch = saved.batches_in_epoch
        else:
            train_state.load_portable_optimizer(portable, self.engine, self.optimizer, self.cfg.train.zero_stage)
            # the data split depends on the world size: continue the epoch at the same
            # fraction (the exact sample order of the old world cannot be re-cut)
            batches_in_epoch = round(saved.batches_in_epoch * saved.world_size / self.world_size)
            log.warning("resuming a checkpoint of %d worker(s), ZeRO-%d with %d worker(s), ZeRO-%d: loaded its "
                        "world-size-free form; the data order of the rest of epoch %d differs from the old run's",
                        saved.world_size, saved.zero_stage, self.world_size, self.cfg.train.zero_stage, saved.epoch)
        self.progress = Progress(step=saved.step, epoch=saved.epoch, batches_in_epoch=batches_in_epoch,
                                 skipped_steps=saved.skipped_steps, bad_steps_in_a_row=saved.bad_steps_in_a_row,
                                 samples_seen=saved.samples_seen, world_size=self.world_size,
                                 zero_stage=self.cfg.train.zero_stage)
        self.metrics.truncate_after(saved.step)
        self.metrics.emit({"event": "resume", "step": saved.step, "epoch": saved.epoch, "from": str(resume_dir),
                           "exact": exact, "from_world_size": saved.world_size})

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
                       "samples_seen": p.samples_seen, "eval": final}
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
            self._run_batches(bar, epoch)
        finally:
            if bar is not None:
                bar.close()
        if self.rank == 0 and epoch.micro_steps:
            log.info("epoch %d: %d steps, loss %.4f, %.1f images/s, %.0f s, data wait %.0f%%, skipped steps %d",
                     p.epoch, epoch.optimizer_steps, epoch.losses["loss"] / epoch.micro_steps,
                     epoch.images * self.world_size / max(epoch.total, 1e-9), epoch.total,
                     100 * epoch.data / max(epoch.total, 1e-9), p.skipped_steps)

    def _run_batches(self, bar, epoch: StepTimes) -> None:
        p, t = self.progress, self.cfg.train
        times = StepTimes()
        tick = time.perf_counter()
        for images, padding_mask, targets in self.loader:
            times.data += time.perf_counter() - tick
            self._forward_backward(images, padding_mask, targets, times)
            p.batches_in_epoch += 1
            times.images += len(targets)
            if bar is not None:
                bar.update(1)
            if p.batches_in_epoch % t.grad_accum == 0:
                self._optimizer_step(times)
                if p.step % t.log_every_steps == 0 or p.step == self.total_steps:
                    self._log(times, bar)
                    epoch.add(times)
                    times = StepTimes()
                if p.step >= self.total_steps or p.batches_in_epoch >= self.batches_per_step_epoch:
                    break
                if (t.checkpoint_every_steps and p.step % t.checkpoint_every_steps == 0) or self._checkpoint_requested():
                    self.save_checkpoint({})
            tick = time.perf_counter()
        epoch.add(times)

    def _forward_backward(self, images, padding_mask, targets, times: StepTimes) -> None:
        p = self.progress
        images, padding_mask = images.to(self.device, non_blocking=True), padding_mask.to(self.device, non_blocking=True)
        targets = [{k: v.to(self.device) for k, v in tgt.items()} for tgt in targets]
        t0 = time.perf_counter()
        outputs = self.engine(images, padding_mask)  # DeepSpeed applies train.precision's autocast
        # losses in fp32: the matcher's costs and the focal loss are not safe in bf16/fp16
        outputs = outputs_to_float(outputs)
        losses = self.criterion(outputs, targets)
        weights = self.criterion.weight_dict
        loss = sum(losses[k] * weights[k] for k in losses if k in weights)
        if p.step in self.nonfinite_at:
            loss = loss * float("nan")
        t1 = time.perf_counter()
        times.forward += t1 - t0
        loss_finite = not comm.any_rank(not bool(torch.isfinite(loss)))
        if loss_finite:
            reduced_before = self._allreduce_s
            self.engine.backward(loss)
            times.allreduce += self._allreduce_s - reduced_before
            for k in ("loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error"):
                if k in losses:
                    times.losses[k] = times.losses.get(k, 0.0) + float(losses[k].detach())
            times.losses["loss"] = times.losses.get("loss", 0.0) + float(loss.detach())
            times.micro_steps += 1
        self._step_bad = self._step_bad or not loss_finite
        times.backward += time.perf_counter() - t1

    def _optimizer_step(self, times: StepTimes) -> None:
        """At the accumulation boundary: the optimizer step, unless a loss or gradient of
        this step was non-finite on any rank."""
        p, t = self.progress, self.cfg.train
        t0 = time.perf_counter()
        self.lrs = set_learning_rates(self.optimizer, self.cfg.optim, p.step, p.epoch)
        bad = self._step_bad
        if t.zero_stage == 0 and not bad:
            # DeepSpeed without ZeRO would apply a NaN gradient (and reports no norm): look first
            self.grad_norm = _grad_norm(self.engine.module)
            bad = comm.any_rank(not math.isfinite(self.grad_norm))
        if bad:
            self.engine.zero_grad()
        else:
            self.engine.step()
            if t.zero_stage > 0:
                # under ZeRO, DeepSpeed itself skips a step whose global gradient norm is not finite
                norm = self.engine.get_global_grad_norm()
                self.grad_norm = None if norm is None else float(norm)
                bad = self.grad_norm is not None and not math.isfinite(self.grad_norm)
        self._step_bad = False
        times.optimizer += time.perf_counter() - t0
        times.optimizer_steps += 1
        p.step += 1
        p.samples_seen += self.cfg.data.batch_size * t.grad_accum * self.world_size
        if bad:
            p.skipped_steps += 1
            p.bad_steps_in_a_row += 1
            log.warning("step %d skipped on every rank: non-finite loss or gradient (%d in a row, %d in all)",
                        p.step - 1, p.bad_steps_in_a_row, p.skipped_steps)
            self.metrics.emit({"event": "skipped_step", "step": p.step, "epoch": p.epoch,
                               "skipped_steps": p.skipped_steps})
            if p.bad_steps_in_a_row >= t.max_bad_steps:
                raise NonFiniteLossError(
                    f"{p.bad_steps_in_a_row} steps in a row had a non-finite loss or gradient (train.max_bad_steps="
                    f"{t.max_bad_steps}), last at step {p.step - 1}. Try a lower optim.lr, optim.warmup_steps > 0, "
                    "optim.clip_max_norm > 0, train.precision=fp32 (bf16/fp16 overflow), and check the data "
                    "(boxes of zero size, wrong category ids).")
        else:
            p.bad_steps_in_a_row = 0

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
        if self.grad_norm is not None:
            record["grad_norm"] = self.grad_norm
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
        self.checkpointer.save(p.step, {"step": p.step, "epoch": p.epoch, **metrics},
                               lambda folder: train_state.save(folder, self.engine, self.optimizer, p))
        self._last_saved_step = p.step
        self.metrics.emit({"event": "checkpoint", "step": p.step, "epoch": p.epoch})

    def save_final_model(self) -> Path:
        """`model_final.pth`: the consolidated fp32 model as {'model': state_dict} with the
        official names (plus our config, which the official code ignores)."""
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
