"""When the train loop saves a checkpoint, in one place: at every epoch end, every
`train.checkpoint_every_steps` steps, when someone creates CHECKPOINT_NOW in the run
directory, when a notice comes (a node about to be preempted, a SIGTERM: `Notice`), and at
the end of the run unless its last step was just saved.

Every answer is the same on every rank (saving is collective): the step counts are, the
request file is looked at by rank 0 alone, and the notices of all ranks are combined in the
one all-reduce per step that the request file needed anyway.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ddetr_dist import comm
from ddetr_dist.engine.metrics import MetricsLog
from ddetr_dist.engine.train_state import Progress


@dataclass(frozen=True)
class Notice:
    """A reason from outside the run to save at the next step. `stop`: after saving, the
    run stops (StopAfterSave) instead of going on, e.g. because this process got SIGTERM."""

    source: str  # what sent it: "preemption", "sigterm", "driver"
    detail: str  # what a person reads: which node, which deadline, which process
    stop: bool = False


# Called by every rank after every step: the notices that arrived since its last call.
# Never a collective (ranks may call it at different moments); cheap (it runs every step).
NoticeSource = Callable[[], "list[Notice]"]


def no_notices() -> list[Notice]:
    return []


class StopAfterSave(Exception):
    """The run saved its checkpoint because of stopping notices and stops now (every rank
    raises it at the same step). Whoever runs the loop decides what stopping means."""

    def __init__(self, step: int, notices: list[Notice]):
        self.step, self.notices = step, notices
        super().__init__(f"stopped after saving the checkpoint of step {step}: "
                         + "; ".join(f"{n.source}: {n.detail}" for n in notices))

    def __reduce__(self):  # Ray sends a worker's exception to the driver pickled
        return type(self), (self.step, self.notices)


# the levels all-reduced (max) each step: what the ranks ask for, together
_NOTHING, _SAVE, _SAVE_AND_STOP = 0, 1, 2


class CheckpointPolicy:
    """The loop asks after each step (`after_step`), at each epoch end (`at_epoch_end`) and
    at the end of the run (`at_finish`), and says when it saved (`saved`). After a save that
    notices asked to stop, `stop_requested` holds them."""

    def __init__(self, every_steps: int, request_file: Path, metrics: MetricsLog,
                 notices: NoticeSource = no_notices):
        self.every_steps = every_steps  # 0: only at epoch ends, on request and at the end
        self.request_file = request_file
        self.metrics = metrics
        self.notices = notices
        self.last_saved_step: int | None = None
        self.stop_requested: list[Notice] = []

    def after_step(self, progress: Progress, at_end: bool) -> bool:
        """Mid-epoch: every `every_steps`, on request, or on a notice. `at_end`: the step ends
        its epoch or the run, where the save that follows anyway serves (a request waits for
        a next step; a stopping notice is kept for `stop_requested`)."""
        asked = self._asked(progress)  # every step, on every rank: it holds a collective
        if at_end:
            return False
        return asked or bool(self.every_steps and progress.step % self.every_steps == 0)

    def at_epoch_end(self) -> bool:
        """Always: a resume then never repeats more than a part of one epoch."""
        return True

    def at_finish(self, step: int) -> bool:
        """Unless the last step was saved already (an epoch ended there)."""
        return self.last_saved_step != step

    def saved(self, step: int) -> None:
        self.last_saved_step = step

    def stop_if_asked(self, progress: Progress, total_steps: int) -> None:
        """Once the checkpoint that stopping notices asked for is saved, stop: every rank
        raises StopAfterSave at the same step (the notices were all-reduced). At the run's
        last step the run just finishes."""
        if self.stop_requested and self.last_saved_step == progress.step and progress.step < total_steps:
            raise StopAfterSave(progress.step, self.stop_requested)

    def _asked(self, progress: Progress) -> bool:
        """Whether someone asked for a checkpoint now: CHECKPOINT_NOW (anyone may create
        it: a checkpoint without stopping; rank 0 looks and consumes it)
        or a notice on any rank. One all-reduce per step tells every rank; only when some
        rank asked, a second collective gathers the notices, for the record and for
        `stop_requested` (the same on every rank)."""
        rank0 = comm.get_rank() == 0
        file_request = rank0 and self.request_file.exists()
        notices = self.notices()
        level = max([_SAVE if file_request else _NOTHING]
                    + [_SAVE_AND_STOP if n.stop else _SAVE for n in notices])
        level = int(comm.all_reduce_max(level))
        if level == _NOTHING:
            return False
        everyone = _unique([n for rank_notices in comm.all_gather_object(notices) for n in rank_notices])
        if file_request:
            self.request_file.unlink(missing_ok=True)
            self.metrics.emit({"event": "checkpoint_requested", "step": progress.step, "epoch": progress.epoch})
        for notice in everyone:
            self.metrics.emit({"event": "notice", "step": progress.step, "epoch": progress.epoch,
                               "source": notice.source, "detail": notice.detail, "stop": notice.stop})
        if level == _SAVE_AND_STOP:
            self.stop_requested = [n for n in everyone if n.stop]
        return True


def _unique(notices: list[Notice]) -> list[Notice]:
    """Each notice once (Ray tells every worker of the same preemption)."""
    return list(dict.fromkeys(notices))
