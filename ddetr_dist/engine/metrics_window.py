"""What the train loop's log lines report: the sums of the steps since the last line (a
window of `train.log_every_steps` steps) and since the epoch began, on this rank, and the
`train` record and the epoch's line made of them."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import Iterator

import torch

from ddetr_dist.engine.metrics import memory_usage
from ddetr_dist.engine.train_state import Progress

log = logging.getLogger("ddetr_dist.train")


@dataclass
class StepTimes:
    """Seconds spent in each phase, images and losses, summed over steps (this rank)."""

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


class MetricsWindow:
    """`times`: the open window, which the step adds to; `epoch`: the closed windows of the
    epoch. `loss_scaler`: fp16's GradScaler, whose scale the records carry (else None)."""

    def __init__(self, world_size: int, log_every_steps: int, total_steps: int, device: torch.device,
                 loss_weights: dict, loss_scaler=None, steps_per_epoch: int | None = None, grad_accum: int = 1):
        self.world_size, self.log_every_steps, self.total_steps = world_size, log_every_steps, total_steps
        self.steps_per_epoch, self.grad_accum = steps_per_epoch, grad_accum  # steps_per_epoch None: no ETA
        self.device, self.loss_weights, self.loss_scaler = device, loss_weights, loss_scaler
        self.times, self.epoch = StepTimes(), StepTimes()

    def start_epoch(self) -> None:
        self.times, self.epoch = StepTimes(), StepTimes()

    def next_batches(self, batches: Iterator, count: int, used: list | None = None) -> list:
        """Up to `count` batches from the loader, the wait for them counted as data time, as
        is the release of the `used` window's batches (emptied here: their tensors' memory
        goes back, about 1 ms for a demo batch; a plain `for batch in loader` pays it at
        the same point)."""
        tick = time.perf_counter()
        if used:
            used.clear()
        window = list(islice(batches, count))
        self.times.data += time.perf_counter() - tick
        return window

    def due(self, step: int) -> bool:
        """A log line after this step (every `log_every_steps`, and the run's last)."""
        return step % self.log_every_steps == 0 or step == self.total_steps

    def close(self) -> StepTimes:
        """Ends the open window (its sums join the epoch's); -> its sums."""
        closed, self.times = self.times, StepTimes()
        self.epoch.add(closed)
        return closed

    def train_record(self, progress: Progress, lrs: dict, grad_norm: float | None, skipped_samples: int) -> dict | None:
        """Closes the window; -> its `train` record for metrics.jsonl, or None when every
        step in it was skipped (and logged as such). `grad_norm`: of the last step taken."""
        times, p = self.close(), progress
        if not times.micro_steps:
            return None
        n = times.micro_steps
        record = {"event": "train", "step": p.step, "epoch": p.epoch,
                  **{k: v / n for k, v in times.losses.items()},
                  "lr": lrs.get("rest", next(iter(lrs.values()))),
                  **{f"lr_{name}": lr for name, lr in lrs.items()},
                  "images_per_s": times.images * self.world_size / max(times.total, 1e-9),
                  "step_time": times.total / max(1, times.optimizer_steps),
                  "data_wait": times.data / max(times.total, 1e-9),
                  "time_forward": times.forward, "time_backward": times.backward, "time_optimizer": times.optimizer,
                  "time_allreduce": times.allreduce,
                  "skipped_steps": p.skipped_steps, "skipped_samples": skipped_samples,
                  **memory_usage(self.device)}
        record.update(self.eta(p, record["step_time"]))
        if grad_norm is not None:  # unscaled, before clipping
            record["grad_norm"] = grad_norm
        if self.loss_scaler is not None:
            record.update(loss_scale=self.loss_scaler.get_scale(), overflow_steps=p.overflow_steps)
        record.update({f"{k}_weighted": record[k] * self.loss_weights[k] for k in list(record)
                       if k in self.loss_weights})
        return record

    def eta(self, progress: Progress, step_time: float) -> dict:
        """Seconds of training steps left in the epoch and in the run, at this window's
        speed (evaluations and checkpoints not counted)."""
        if not self.steps_per_epoch:
            return {}
        steps_left = max(0, self.total_steps - progress.step)
        in_epoch = max(0, self.steps_per_epoch - progress.batches_in_epoch // self.grad_accum)
        return {"eta_epoch_s": min(in_epoch, steps_left) * step_time, "eta_s": steps_left * step_time}

    def log_epoch(self, progress: Progress) -> None:
        """The epoch's line (after `close`): its steps, mean loss, speed and data wait."""
        epoch, p = self.epoch, progress
        if not epoch.micro_steps:
            return
        log.info("epoch %d: %d steps, loss %.4f, %.1f images/s, %.0f s, data wait %.0f%%, skipped steps %d",
                 p.epoch, epoch.optimizer_steps, epoch.losses["loss"] / epoch.micro_steps,
                 epoch.images * self.world_size / max(epoch.total, 1e-9), epoch.total,
                 100 * epoch.data / max(epoch.total, 1e-9), p.skipped_steps)
