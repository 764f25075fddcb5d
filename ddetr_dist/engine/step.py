"""One optimizer step: a window of `train.grad_accum` micro-batches through the DeepSpeed
engine, and what happens when something in it is not finite.

DeepSpeed's protocol is forward, `backward()`, `step()` for *every* micro-batch; the
`step()` of the window's last micro-batch (the accumulation boundary, which we set
explicitly so that DeepSpeed's counter cannot drift from ours) reduces the gradients and
updates the weights. The losses of all micro-batches are normalised by the window's
mean number of target boxes per micro-batch, and DeepSpeed divides each by
`grad_accum`: k micro-batches of b images give the gradient of one batch of k*b.

A window is *bad* when a loss (any micro-batch, any rank: decided together) or the
reduced gradient is not finite. A bad window updates nothing on any rank:
- ZeRO-0: we look at the gradients before `step()` and drop them;
- ZeRO-1/2/3: the boundary's backward is made non-finite on purpose, so that DeepSpeed's
  own overflow check skips the step and clears its partitioned buffers.

fp16 (ZeRO-0 only) uses a dynamic loss scale (torch's GradScaler inside DeepSpeed's
engine): an overflowing step is skipped, the scale halves, and it doubles again after
`train.loss_scale_window` clean steps. Such a step is an *overflow*, which is expected
while the scale searches, not a bad step; once the scale is down to `MIN_LOSS_SCALE`, an
overflow is a non-finite gradient like any other.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ddetr_dist import comm
from ddetr_dist.engine.evaluate import outputs_to_float
from ddetr_dist.engine.metrics_window import StepTimes
from ddetr_dist.engine.stale_gradients import StaleGradients, frees_late
from ddetr_dist.engine.zero_grad_norm import use_fused_grad_norm

MIN_LOSS_SCALE = 1.0
LOGGED_LOSSES = ("loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error")


@dataclass
class StepResult:
    applied: bool  # the weights were updated
    overflow: bool = False  # fp16: skipped while the loss scale searches (not a bad step)
    grad_norm: float | None = None  # unscaled, before clipping
    loss_scale: float | None = None  # fp16: the scale after this step


def clip_gradients(module: torch.nn.Module, max_norm: float) -> float:
    """ZeRO-0: the global L2 norm of the (already reduced) gradients, NaN/inf if any is; and
    clipped to `max_norm` (0 = not clipped). One fused norm (torch's foreach kernels) serves
    both the clip and the log: DeepSpeed's own clip loops over the parameters in Python and
    all-reduces the norm of gradients that are already equal on every rank."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True))


def install_loss_scaler(engine, device: torch.device, initial_power: int, window: int) -> torch.amp.GradScaler:
    """fp16 under ZeRO-0: DeepSpeed's engine scales the loss with a torch GradScaler of
    default settings; replace it with one of ours (`train.loss_scale_power`,
    `train.loss_scale_window`), whose state our checkpoints keep."""
    if not hasattr(engine, "torch_autocast_z0_gradscaler"):
        raise RuntimeError("train.precision=fp16 relies on DeepSpeed's torch-autocast GradScaler "
                           "(engine.torch_autocast_z0_gradscaler, deepspeed 0.19); this DeepSpeed has none")
    scaler = torch.amp.GradScaler(device=device.type, init_scale=2.0 ** initial_power, growth_interval=window)
    engine.torch_autocast_z0_gradscaler = scaler
    return scaler


def window_num_boxes(window: list) -> float:
    """The loss normaliser of every micro-batch in the window: the mean number of target
    boxes per micro-batch over the window's micro-batches on all ranks (collective)."""
    boxes = sum(len(t["labels"]) for _, _, targets in window for t in targets)
    return comm.all_reduce_sum([boxes])[0] / (comm.get_world_size() * len(window))


class WindowStep:
    """Runs optimizer steps on one rank's DeepSpeed engine: `run(window, times)`. What a step
    does goes by the stage the engine runs at (deepspeed_config.engine_stage: ZeRO-1/2 on one
    rank run as ZeRO-0), not by train.zero_stage."""

    def __init__(self, engine, criterion, device: torch.device,
                 loss_scaler: torch.amp.GradScaler | None = None, clip_max_norm: float = 0.0):
        self.engine, self.criterion, self.device = engine, criterion, device
        self.zero_stage = zero_stage = engine.zero_optimization_stage()
        self.clip_max_norm = clip_max_norm  # ZeRO-0 clips here (deepspeed_config gives DeepSpeed 0)
        self.loss_scaler = loss_scaler
        self._allreduce_s = 0.0
        self._time_allreduce()
        if zero_stage in (1, 2):
            use_fused_grad_norm(engine.optimizer)
        if zero_stage == 0 and comm.get_world_size() == 1:
            # one rank has nothing to reduce: DeepSpeed would still flatten every gradient into
            # a buffer, "average" it over one rank and copy it back, each step
            engine.enable_backward_allreduce = False
        # ZeRO-0 on a CPU: gradients freed before the next backward, not after the update (page faults)
        self.stale_gradients = StaleGradients(engine, frees_late(zero_stage, device))

    def _time_allreduce(self) -> None:
        """Wrap DeepSpeed's boundary gradient reduction to time it (one clock read each)."""
        reduce = self.engine.allreduce_gradients

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return reduce(*args, **kwargs)
            finally:
                self._allreduce_s += time.perf_counter() - start

        self.engine.allreduce_gradients = timed

    def run(self, window: list, times: StepTimes, poisoned: bool = False, loss_factor: float = 1.0) -> StepResult:
        """Forward/backward/step every micro-batch of `window`, adding the time each phase
        took to `times`. `poisoned` makes every loss NaN, `loss_factor` multiplies them
        (fault injection for tests: engine/faults.py)."""
        num_boxes = window_num_boxes(window)
        bad = False
        for index, (images, padding_mask, targets) in enumerate(window):
            boundary = index == len(window) - 1
            self.engine.set_gradient_accumulation_boundary(boundary)
            loss, finite_here = self._forward(images, padding_mask, targets, num_boxes, times, poisoned, loss_factor)
            finite = not comm.any_rank(not finite_here)
            bad = bad or not finite
            if boundary:
                return self._boundary(loss, bad, times)
            t0 = time.perf_counter()
            if finite and not bad:
                self._backward(loss)  # no reduction before the boundary
            self.engine.step()  # off the boundary DeepSpeed only counts the micro-step
            times.backward += time.perf_counter() - t0
        raise ValueError("an empty accumulation window")

    def _forward(self, images, padding_mask, targets, num_boxes, times, poisoned,
                 loss_factor) -> tuple[torch.Tensor, bool]:
        """-> the weighted loss and whether it is finite (on this rank)."""
        images = images.to(self.device, non_blocking=True)
        padding_mask = padding_mask.to(self.device, non_blocking=True)
        targets = [{k: v.to(self.device) for k, v in tgt.items()} for tgt in targets]
        t0 = time.perf_counter()
        outputs = self.engine(images, padding_mask)  # DeepSpeed applies train.precision's autocast
        # losses in fp32: the matcher's costs and the focal loss are not safe in bf16/fp16
        losses = self.criterion(outputs_to_float(outputs), targets, num_boxes=num_boxes)
        weights = self.criterion.weight_dict
        loss = sum(losses[k] * weights[k] for k in losses if k in weights) * loss_factor
        if poisoned:
            loss = loss * float("nan")
        times.forward += time.perf_counter() - t0
        times.images += len(targets)
        # the logged terms in one read (one host sync on a GPU, not one per term)
        logged = [k for k in LOGGED_LOSSES if k in losses] + ["loss"]
        values = torch.stack([losses[k].detach().float() for k in logged[:-1]] + [loss.detach().float()]).tolist()
        finite = math.isfinite(values[-1])
        if finite:
            for k, value in zip(logged, values):
                times.losses[k] = times.losses.get(k, 0.0) + value
            times.micro_steps += 1
        return loss, finite

    def _backward(self, loss: torch.Tensor) -> None:
        self.stale_gradients.free_before_backward()  # the last step's, if it left them (ZeRO-0 on a CPU)
        self.engine.backward(loss)

    def _boundary(self, loss: torch.Tensor, bad: bool, times: StepTimes) -> StepResult:
        """The window's last micro-batch: its backward (which reduces the gradients), then
        the update or the skip."""
        t0 = time.perf_counter()
        reduced_before = self._allreduce_s
        if self.zero_stage > 0:
            # a bad window: NaN gradients make DeepSpeed's overflow check skip the step and
            # clear the partitioned gradients it accumulated (our own skip could not reach them)
            self._backward(loss * float("nan") if bad else loss)
        elif not bad:
            self._backward(loss)
        t1 = time.perf_counter()
        result = self._step_zero0(bad) if self.zero_stage == 0 else self._step_zero()
        times.backward += t1 - t0
        times.optimizer += time.perf_counter() - t1
        times.allreduce += self._allreduce_s - reduced_before
        times.optimizer_steps += 1
        return result

    def _step_zero(self) -> StepResult:
        """ZeRO-1/2/3: DeepSpeed skips a step whose gradients are not finite by itself."""
        self.engine.step()
        applied = self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()
        return StepResult(applied=applied, grad_norm=float(norm) if applied and norm is not None else None)

    def _step_zero0(self, bad: bool) -> StepResult:
        """ZeRO-0: DeepSpeed would apply a NaN gradient (and reports no norm): look first.
        The clip is ours (one fused norm); under fp16 the gradients are unscaled first, and the
        GradScaler, seeing the unscale's overflow, skips the update in engine.step()."""
        scaler = self.loss_scaler
        if bad:
            self.engine.zero_grad()
            return StepResult(applied=False, loss_scale=scaler.get_scale() if scaler is not None else None)
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.unscale_(self.engine.optimizer)
            norm = clip_gradients(self.engine.module, self.clip_max_norm)
            self.engine.step()
            new_scale = scaler.get_scale()
            overflow = new_scale < scale
            return StepResult(applied=not overflow, overflow=overflow and scale > MIN_LOSS_SCALE,
                              grad_norm=None if overflow else norm, loss_scale=new_scale)
        norm = clip_gradients(self.engine.module, self.clip_max_norm)
        if comm.any_rank(not math.isfinite(norm)):
            self.engine.zero_grad()
            return StepResult(applied=False)
        self.engine.step()
        return StepResult(applied=True, grad_norm=norm)
