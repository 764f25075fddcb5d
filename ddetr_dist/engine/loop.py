"""The train loop of one worker: a DeepSpeed engine around the detector, this rank's split
of the train shards, checkpoints through a `Checkpointer` (Ray's, or a folder of the run
directory without Ray), and metrics through `MetricsLog`.

It knows nothing of Ray: `ddetr_dist.on_ray.worker` runs it inside a Ray Train worker, the
benchmark in one plain process. Read `fit` top to bottom; each job it hands off has its own file
in engine/: step.py (one optimizer step: `train.grad_accum` batches through DeepSpeed,
non-finite numbers in it), bad_steps.py (what a skipped step means), metrics_window.py (the
numbers of the log lines), checkpoint_policy.py (when to save), checkpoint_writer.py (saves
written in the background), train_state.py and resume.py
(what a checkpoint holds, where a resume continues), init_weights.py (fine-tuning's start),
eval_hook.py, final_outputs.py (the run's end: model_final.pth), run_dir.py (the run's paths)
and run_store.py (its copy in object storage).

Run-level decisions that precede a collective (resume from which checkpoint and how,
evaluate or not, save or not) are taken on rank 0 and broadcast: ranks reading files on
their own can disagree (NFS) and leave one waiting in a collective the others skipped.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ddetr_dist.config import Config, pad_multiple
from ddetr_dist.data import build_train_loader
from ddetr_dist import comm
from ddetr_dist.console import without_library_prints
from ddetr_dist.engine import train_state
from ddetr_dist.engine.bad_steps import count_step
from ddetr_dist.engine.checkpoint_policy import CheckpointPolicy, NoticeSource, no_notices
from ddetr_dist.engine.checkpoint_writer import CheckpointWriter
from ddetr_dist.engine.checkpointers import Checkpointer
from ddetr_dist.engine.compile import compile_engine
from ddetr_dist.engine.deepspeed_config import bind_deepspeed_to, deepspeed_config, import_deepspeed
from ddetr_dist.engine.eval_hook import EvalHook
from ddetr_dist.engine.faults import InjectedFaults
from ddetr_dist.engine.final_outputs import finish_run
from ddetr_dist.engine.init_weights import load_init_checkpoint, with_classes_of_data
from ddetr_dist.engine.metrics import MetricsLog
from ddetr_dist.engine.metrics_window import MetricsWindow
from ddetr_dist.engine.optim import build_optimizer, set_learning_rates
from ddetr_dist.engine.portable import load_portable_model
from ddetr_dist.engine.resume import plan_resume, resume_into
from ddetr_dist.engine.run_dir import RunDir
from ddetr_dist.engine.run_store import PUSH_EVERY_S, RunStore
from ddetr_dist.engine.step import StepResult, WindowStep, install_loss_scaler
from ddetr_dist.engine.tensorboard import TensorBoardSink
from ddetr_dist.engine.train_state import Progress
from ddetr_dist.engine.world_size import record_world_size
from ddetr_dist.models import build_model

# tqdm-like: called with total=, initial=, desc=; has update(n), set_description(text), close()
ProgressBar = Callable[..., object]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


class Trainer:
    """One worker's training: `Trainer(cfg, run_dir, checkpointer).fit()`."""

    def __init__(self, cfg: Config, run_dir: Path | RunDir, checkpointer: Checkpointer,
                 device: torch.device | None = None, progress_bar: ProgressBar | None = None,
                 notices: NoticeSource = no_notices):
        import_deepspeed()  # the engine's dependency, not the model's
        self.cfg, self.run_dir, self.checkpointer = cfg, RunDir(run_dir), checkpointer
        self.device = device or torch.device("cpu")
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()
        self.metrics = MetricsLog(self.run_dir.metrics, enabled=self.rank == 0)
        # rank 0's run directory (in object storage: its working copy, pushed after each save)
        self.run_store = RunStore.opened_by_rank_0(self.run_dir) if self.rank == 0 else None
        self.progress_bar = progress_bar  # None: log lines only
        self.faults = InjectedFaults()
        # notices: what the runner hears from outside (a node's preemption, SIGTERM): save now
        self.checkpoints = CheckpointPolicy(cfg.train.checkpoint_every_steps, self.run_dir.checkpoint_request,
                                            self.metrics, notices)
        # saves write in the background; the loop waits for a CPU copy of the state only
        self.checkpoint_writes = CheckpointWriter(background=cfg.train.async_checkpoint, on_complete=self._saved)
        self.lrs: dict[str, float] = {}
        self.last_step = StepResult(applied=False)
        self.ds_config = deepspeed_config(cfg, self.world_size)  # refuses what DeepSpeed cannot do
        model = self._build_model_and_loader()
        with checkpointer.latest() as resume_dir:
            self._build_engine(model, resume_dir)
        self.stepper = WindowStep(self.engine, self.criterion, self.device, self.loss_scaler, cfg.optim.clip_max_norm)
        self.window = MetricsWindow(self.world_size, cfg.train.log_every_steps, self.total_steps, self.device,
                                    self.criterion.weight_dict, self.loss_scaler, self.steps_per_epoch,
                                    cfg.train.grad_accum)
        # after a resume, TensorBoard drops what was logged after the checkpoint (it is redone)
        self.tensorboard = TensorBoardSink(self.run_dir.tensorboard, purge_step=self.progress.step + 1) \
            if self.rank == 0 else None
        if self.tensorboard is not None:
            self.metrics.sinks.append(self.tensorboard)
        self.eval_hook = EvalHook(cfg, self.run_dir, self.engine.module, self.criterion, self.postprocess,
                                  self.device, self.metrics, self.tensorboard,
                                  lockstep=self.engine.zero_optimization_stage() == 3)

    # ------------------------------------------------------------------ build and resume

    def _build_model_and_loader(self) -> torch.nn.Module:
        """The detector (the same weights on every rank) and this rank's train loader."""
        cfg = self.cfg = with_classes_of_data(self.cfg)  # 'auto' when run without the driver
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model, self.criterion, self.postprocess = build_model(cfg)
        # from here on each rank draws its own numbers (dropout masks): seed + rank, as the
        # official code does; DeepSpeed broadcasts rank 0's weights anyway
        _seed_everything(cfg.seed + self.rank)
        self.loader = build_train_loader(cfg.data, seed=cfg.seed, rank=self.rank, world_size=self.world_size,
                                         pin_memory=self.device.type == "cuda", pad_to_multiple=pad_multiple(cfg))
        self.batches_per_epoch = len(self.loader)
        self.steps_per_epoch = max(1, self.batches_per_epoch // cfg.train.grad_accum)
        self.total_steps = cfg.train.max_steps or cfg.optim.epochs * self.steps_per_epoch
        self.progress = Progress(world_size=self.world_size, zero_stage=cfg.train.zero_stage,
                                 batches_per_epoch=self.batches_per_epoch,
                                 data_order=train_state.data_order(cfg, self.loader.shards))
        return model

    def _build_engine(self, model: torch.nn.Module, resume_dir: Path | None) -> None:
        """The DeepSpeed engine around `model`, resumed from `resume_dir` when there is one."""
        deepspeed, cfg = import_deepspeed(), self.cfg
        saved, changed = comm.decided_by_rank_0(lambda: plan_resume(resume_dir, self.progress))
        # every resume starts from the checkpoint's one (world-size-free) copy of the weights
        portable = load_portable_model(resume_dir, model) if saved is not None else None
        load_init_checkpoint(cfg, model, resuming=saved is not None, metrics=self.metrics)  # fine-tuning
        model.to(self.device)
        self.optimizer = build_optimizer(model, cfg.optim, cfg.model)
        with without_library_prints():
            self.engine, *_ = deepspeed.initialize(args=bind_deepspeed_to(self.device), model=model,
                                                   optimizer=self.optimizer, config=self.ds_config,
                                                   dist_init_required=False)
        self.compiles = compile_engine(self.engine, cfg, self.metrics, self.batches_per_step_epoch)  # train.compile
        self.loss_scaler = install_loss_scaler(self.engine, self.device, cfg.train.loss_scale_power,
                                               cfg.train.loss_scale_window) if cfg.train.precision == "fp16" else None
        if saved is not None:
            resume_into(self, resume_dir, saved, changed, portable)  # optimizer state, RNG, progress, log
        else:  # a group restarted before any checkpoint was registered starts over: so does its log
            self.metrics.truncate_after(0)
        # every start: its world size, global batch and lr rule, and the DeepSpeed JSON it runs with
        record_world_size(self.metrics, self.cfg, self.world_size, self.progress, self.steps_per_epoch,
                          saved.world_size if saved is not None else None, self.ds_config, self.run_dir)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> Progress:
        """Train to `train.max_steps` (or `optim.epochs`), checkpointing as CheckpointPolicy
        says; then evaluate and write model_final.pth."""
        p = self.progress
        self.engine.train()
        try:
            while p.step < self.total_steps:
                self.loader.set_epoch(p.epoch, skip_batches=p.batches_in_epoch)
                self._train_epoch()
                if p.batches_in_epoch >= self.batches_per_step_epoch:
                    self._end_epoch()
                    self.checkpoints.stop_if_asked(p, self.total_steps)
            finish_run(self)  # the last evaluation and checkpoint, model_final.pth, the summary
        finally:  # a pending save completes before the worker leaves (StopAfterSave: the one it stops for)
            self.checkpoint_writes.wait()
        return p

    @property
    def batches_per_step_epoch(self) -> int:
        """Batches of this rank an epoch uses (whole optimizer steps)."""
        return self.steps_per_epoch * self.cfg.train.grad_accum

    def _train_epoch(self) -> None:
        """Until the epoch's batches are used or the run's steps are done."""
        p, k = self.progress, self.cfg.train.grad_accum
        bar = self.progress_bar(total=self.batches_per_step_epoch, initial=p.batches_in_epoch,
                                desc=f"epoch {p.epoch}") if self.rank == 0 and self.progress_bar else None
        self.window.start_epoch()
        batches = iter(self.loader)
        window: list = []
        try:
            while p.step < self.total_steps and p.batches_in_epoch < self.batches_per_step_epoch:
                window = self.window.next_batches(batches, k, used=window)
                if len(window) < k:
                    break  # the loader ended early (it yields whole epochs of whole steps)
                self._optimizer_step(window)
                self.checkpoint_writes.poll()  # a save that completed is recorded; one that failed ends the run
                p.batches_in_epoch += len(window)
                if bar is not None:
                    bar.update(len(window))
                if self.window.due(p.step):
                    self._log(bar)
                at_end = p.step >= self.total_steps or p.batches_in_epoch >= self.batches_per_step_epoch
                if self.checkpoints.after_step(p, at_end):
                    self.save_checkpoint({})
                self.checkpoints.stop_if_asked(p, self.total_steps)
            self.window.close()
        finally:
            if bar is not None:
                bar.close()
        if self.rank == 0:
            self.window.log_epoch(p)

    def _optimizer_step(self, window: list) -> None:
        p = self.progress
        self.lrs = set_learning_rates(self.optimizer, self.cfg.optim, p.step, p.epoch)
        self.last_step = self.stepper.run(window, self.window.times, self.faults.poisoned(p.step),
                                          loss_factor=self.faults.loss_factor(p.step))
        p.step += 1
        self.compiles.after_step(p, window)  # counts and logs compilations (train.compile)
        p.samples_seen += self.cfg.data.batch_size * self.cfg.train.grad_accum * self.world_size
        count_step(self.last_step, p, self.cfg.train.max_bad_steps, self.metrics)

    def _log(self, bar=None) -> None:
        record = self.window.train_record(self.progress, self.lrs, self.last_step.grad_norm, self.loader.skips.total)
        if record is None:  # every step since the last line was skipped (and logged as such)
            return
        self.metrics.emit(record)
        if self.run_store is not None:
            self.run_store.push(every_s=PUSH_EVERY_S)
        if bar is not None:
            bar.set_description(f"epoch {record['epoch']} loss {record['loss']:.3f} {record['images_per_s']:.1f} img/s")

    def _end_epoch(self) -> None:
        p = self.progress
        finished = p.epoch
        p.epoch, p.batches_in_epoch = p.epoch + 1, 0
        metrics = {"epoch_finished": finished}
        if self.eval_hook.due(finished):
            self.checkpoint_writes.wait()  # a pending save completes before an evaluation
            metrics.update(self.eval_hook(p.step, p.epoch))
        if self.checkpoints.at_epoch_end():
            self.save_checkpoint(metrics)

    def save_checkpoint(self, metrics: dict) -> None:
        """Collective: every rank takes its part of the state (a CPU copy: the loop's stall);
        the files are written and registered in the background (engine/checkpoint_writer.py)."""
        p = self.progress
        p.loss_scaler = self.loss_scaler.state_dict() if self.loss_scaler is not None else None
        self.checkpoint_writes.save(self.checkpointer, self.engine, self.optimizer, p,
                                    {"step": p.step, "epoch": p.epoch, **metrics}, self.faults.before_save_write)
        self.checkpoints.saved(p.step)

    def _saved(self, saved: dict, stall_s: float, write_s: float) -> None:
        """A checkpoint is complete and registered: its record, then the store's copy of the run."""
        self.metrics.emit({"event": "checkpoint", "step": saved["step"], "epoch": saved["epoch"],
                           "stall_s": round(stall_s, 4), "write_s": round(write_s, 3)})
        if self.run_store is not None:
            self.run_store.push()
