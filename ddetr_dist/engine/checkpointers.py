"""Where the train loop's checkpoints go: the `Checkpointer` protocol, and a folder of the
run directory for runs without Ray (tests, the benchmark, a notebook). Ray's own is in
`ddetr_dist.on_ray.worker`.

Saving reads top to bottom in the loop (Trainer.save_checkpoint):

    folder = checkpointer.folder(step)                      # this rank's folder for its files
    rest = train_state.snapshot(folder, ...)                # collective: RNG files, a CPU copy of the state
    writer.submit(step, lambda: (rest(), checkpointer.register(folder, step, metrics)))
    # in the background (engine/checkpoint_writer.py): portable.pt, meta.json last, and only
    # then does the folder become the run's checkpoint of `step`, with `metrics` attached
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

    def folder(self, step: int) -> Path:
        """This rank's folder for its files of the checkpoint of `step`."""

    def register(self, folder: Path, step: int, metrics: dict) -> None:
        """Called by every rank once its files in `folder` are written (meta.json last, on
        rank 0): the folders of all ranks become one checkpoint with `metrics` attached. It
        may run in the checkpoint writer's thread while the loop trains on, so it takes no
        torch.distributed collective (those belong to the loop's thread)."""

    def report(self, metrics: dict) -> None:
        """Collective: metrics without a checkpoint (e.g. an evaluation); never while a
        save is pending (the loop waits for it first: reports keep their order)."""


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

    def folder(self, step: int) -> Path:
        folder = self.run_dir.folder_checkpoint(step)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def register(self, folder: Path, step: int, metrics: dict) -> None:
        # meta.json (rank 0's last file) marks the folder complete; rank 0 wrote it after every
        # rank's files (train_state.snapshot's barrier): older ones can go now, not before
        if comm.get_rank() == 0:
            for old in self._complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def report(self, metrics: dict) -> None:
        pass
