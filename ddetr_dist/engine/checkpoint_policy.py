"""When the train loop saves a checkpoint, in one place: at every epoch end, every
`train.checkpoint_every_steps` steps, when someone creates CHECKPOINT_NOW in the run
directory, and at the end of the run unless its last step was just saved.

Every answer is the same on every rank (saving is collective): the step counts are, and
the request file is looked at by rank 0 alone, which tells the others.
"""
from __future__ import annotations

from pathlib import Path

from ddetr_dist import comm
from ddetr_dist.engine.metrics import MetricsLog
from ddetr_dist.engine.train_state import Progress


class CheckpointPolicy:
    """The loop asks after each step (`after_step`), at each epoch end (`at_epoch_end`) and
    at the end of the run (`at_finish`), and says when it saved (`saved`)."""

    def __init__(self, every_steps: int, request_file: Path, metrics: MetricsLog):
        self.every_steps = every_steps  # 0: only at epoch ends, on request and at the end
        self.request_file = request_file
        self.metrics = metrics
        self.last_saved_step: int | None = None

    def after_step(self, progress: Progress, at_end: bool) -> bool:
        """Mid-epoch: every `every_steps`, or on request. `at_end`: the step ends its epoch or
        the run, where the save that follows anyway serves (a request waits for a next step)."""
        if at_end:
            return False
        if self.every_steps and progress.step % self.every_steps == 0:
            return True
        return self._requested(progress)

    def at_epoch_end(self) -> bool:
        """Always: a resume then never repeats more than a part of one epoch."""
        return True

    def at_finish(self, step: int) -> bool:
        """Unless the last step was saved already (an epoch ended there)."""
        return self.last_saved_step != step

    def saved(self, step: int) -> None:
        self.last_saved_step = step

    def _requested(self, progress: Progress) -> bool:
        """Whether someone asked for a checkpoint now by creating CHECKPOINT_NOW (the SLURM
        script does before a time limit or requeue; anyone may). Rank 0 looks, every rank
        learns it in one all-reduce per step, and the request is consumed."""
        rank0 = comm.get_rank() == 0
        requested = comm.any_rank(rank0 and self.request_file.exists())
        if requested and rank0:
            self.request_file.unlink(missing_ok=True)
            self.metrics.emit({"event": "checkpoint_requested", "step": progress.step, "epoch": progress.epoch})
        return requested
