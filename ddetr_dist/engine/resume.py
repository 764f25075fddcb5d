"""Where a resumed run continues. With the world size, ZeRO stage and everything else that
decides the sample order unchanged, exactly where the checkpoint was taken (every rank's
RNG too: engine/train_state.py restores it). Otherwise at the same fraction of the epoch,
and the log names what changed. Either way the weights and AdamW state come from the
checkpoint's one, world-size-free copy (engine/portable.py).

The plan is made on rank 0 and broadcast: ranks reading a checkpoint on their own can
disagree (NFS) and leave one waiting in a collective the others skipped.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ddetr_dist.engine import train_state
from ddetr_dist.engine.portable import load_portable_optimizer
from ddetr_dist.engine.train_state import Progress

log = logging.getLogger("ddetr_dist.train")


def plan_resume(resume_dir: Path | None, now: Progress) -> tuple[Progress | None, list[str]]:
    """(On rank 0.) The checkpoint's progress, after checking every rank's part is there,
    and what changed since in what decides the sample order ([] = resume exactly)."""
    if resume_dir is None:
        return None, []
    saved = Progress.read(resume_dir)
    train_state.check_complete(resume_dir, saved)
    return saved, train_state.order_changes(saved, now)


def resumed_progress(resume_dir: Path, saved: Progress, changed: list[str], now: Progress, grad_accum: int,
                     batches_per_step_epoch: int) -> Progress:
    """`now` (this run's shape) at the checkpoint's step, epoch and counters. `changed`: the
    old run's data order cannot be replayed, so the epoch continues at the same fraction,
    on a step boundary."""
    k = grad_accum
    if not changed:
        batches_in_epoch = saved.batches_in_epoch
    else:
        fraction = saved.batches_in_epoch / (saved.batches_per_epoch or
                                             now.batches_per_epoch * now.world_size / saved.world_size)
        batches_in_epoch = min(k * int(fraction * now.batches_per_epoch / k), batches_per_step_epoch)
        log.warning("resuming %s not exactly: %s changed; the order of the "
                    "samples in the rest of epoch %d differs from the old run's", resume_dir, "; ".join(changed),
                    saved.epoch)
    return dataclasses.replace(
        now, step=saved.step, epoch=saved.epoch, batches_in_epoch=batches_in_epoch,
        skipped_steps=saved.skipped_steps, overflow_steps=saved.overflow_steps,
        bad_steps_in_a_row=saved.bad_steps_in_a_row, samples_seen=saved.samples_seen)


def resume_into(t, resume_dir: Path, saved: Progress, changed: list[str], portable: dict | None) -> None:
    """The Trainer `t` (engine/loop.py), its engine built from the checkpoint's weights, continues the run:
    AdamW's state, every RNG (an exact resume), the progress, the fp16 loss scale, and the
    log cut back to the checkpoint (the steps after it are redone)."""
    load_portable_optimizer(portable, t.engine, t.optimizer)
    if not changed:  # after the optimizer's warm-up step, though that draws no random number
        train_state.restore_rng(resume_dir)
    t.progress = resumed_progress(resume_dir, saved, changed, t.progress, t.cfg.train.grad_accum,
                                  t.batches_per_step_epoch)
    if t.loss_scaler is not None and saved.loss_scaler:
        t.loss_scaler.load_state_dict(saved.loss_scaler)
    t.metrics.truncate_after(saved.step)
    t.metrics.emit({"event": "resume", "step": saved.step, "epoch": saved.epoch, "from": str(resume_dir),
                    "exact": not changed, "changed": changed, "from_world_size": saved.world_size})
