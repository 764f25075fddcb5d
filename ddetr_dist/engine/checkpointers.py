"""Where the train loop's checkpoints go: the `Checkpointer` protocol, and a folder of the
run directory for runs without Ray (tests, the benchmark, a notebook). Ray's own is in
`ddetr_dist.on_ray.worker`.

Saving reads top to bottom in the loop:

    with checkpointer.saving(step, metrics) as folder:   # a folder for this rank's files
        train_state.save(folder, ...)                    # every rank writes its part
    # here the folder has become the run's checkpoint of `step`, with `metrics` attached
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import ContextManager, Iterator, Optional, Protocol

from ddetr_dist import comm
from ddetr_dist.engine import train_state
from ddetr_dist.engine.run_dir import RunDir


class Checkpointer(Protocol):
    def latest(self) -> ContextManager[Optional[Path]]:
        """The checkpoint to resume from (a directory), or None."""

    def saving(self, step: int, metrics: dict) -> ContextManager[Path]:
        """Collective: a folder for this rank's files; when the block ends without an error,
        the folders of all ranks become one checkpoint with `metrics` attached."""

    def report(self, metrics: dict) -> None:
        """Collective: metrics without a checkpoint (e.g. an evaluation)."""


class FolderCheckpointer:
    """Checkpoints in the run directory's `checkpoints/step_<n>/` without Ray (one process,
    or ranks sharing a file system); the newest complete one resumes."""

    def __init__(self, run_dir: RunDir, keep: int = 2):
        self.run_dir, self.keep = RunDir(run_dir), keep

    def _complete(self) -> list[Path]:
        return [d for d in self.run_dir.folder_checkpoints_by_step() if (d / train_state.META).exists()]

    @contextlib.contextmanager
    def latest(self) -> Iterator[Optional[Path]]:
        # rank 0 picks: ranks listing a shared folder on their own may see different newest ones
        done = comm.decided_by_rank_0(self._complete)
        yield done[-1] if done else None

    @contextlib.contextmanager
    def saving(self, step: int, metrics: dict) -> Iterator[Path]:
        folder = self.run_dir.folder_checkpoint(step)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        comm.barrier()
        if comm.get_rank() == 0:
            for old in self._complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def report(self, metrics: dict) -> None:
        pass
