"""What a step that updated nothing means for the run. An fp16 overflow while the loss
scale searches is expected: counted and logged. A non-finite loss or gradient is a bad
step: `train.max_bad_steps` of them in a row end the run with advice (a restart would
meet the same numbers, hence not retried)."""
from __future__ import annotations

import logging

from ddetr_dist.engine.metrics import MetricsLog
from ddetr_dist.engine.step import StepResult
from ddetr_dist.engine.train_state import Progress
from ddetr_dist.errors import NotRetryable

log = logging.getLogger("ddetr_dist.train")


class NonFiniteLossError(NotRetryable):
    """Too many consecutive steps had a non-finite loss or gradient."""


def count_step(result: StepResult, progress: Progress, max_bad_steps: int, metrics: MetricsLog) -> None:
    """After `progress.step` was advanced past the step of `result`: its counters, and the
    record of a skipped step. Raises NonFiniteLossError after too many bad steps in a row."""
    p = progress
    if result.applied:
        p.bad_steps_in_a_row = 0
        return
    p.skipped_steps += 1
    if result.overflow:
        p.overflow_steps += 1
        log.info("step %d skipped: fp16 gradients overflowed; loss scale now %g", p.step - 1, result.loss_scale)
        metrics.emit({"event": "skipped_step", "step": p.step, "epoch": p.epoch, "reason": "fp16 overflow",
                      "loss_scale": result.loss_scale, "skipped_steps": p.skipped_steps})
        return
    p.bad_steps_in_a_row += 1
    log.warning("step %d skipped on every rank: non-finite loss or gradient (%d in a row, %d in all)",
                p.step - 1, p.bad_steps_in_a_row, p.skipped_steps)
    metrics.emit({"event": "skipped_step", "step": p.step, "epoch": p.epoch, "reason": "non-finite",
                  "skipped_steps": p.skipped_steps})
    if p.bad_steps_in_a_row >= max_bad_steps:
        raise NonFiniteLossError(
            f"{p.bad_steps_in_a_row} steps in a row had a non-finite loss or gradient (train.max_bad_steps="
            f"{max_bad_steps}), last at step {p.step - 1}. Try a lower optim.lr, optim.warmup_steps > 0, "
            "optim.clip_max_norm > 0, train.precision=fp32 (bf16/fp16 overflow), and check the data "
            "(boxes of zero size, wrong category ids).")
