"""Where the train loop's checkpoints go: the `Checkpointer` protocol, and a folder of the
run directory for runs without Ray (tests, the benchmark, a notebook). Ray's own is in
`ddetr_dist.on_ray.worker`."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Optional, Protocol

from ddetr_dist import comm
from ddetr_dist.engine import train_state


class Checkpointer(Protocol):
    def latest(self) -> ContextManager[Optional[Path]]:
        """The checkpoint to resume from (a directory), or None."""

    def save(self, step: int, metrics: dict, write: Callable[[Path], None]) -> None:
        """Collective: each rank calls `write(folder)` to put its files in a folder, which
        becomes one checkpoint with `metrics` attached."""

    def report(self, metrics: dict) -> None:
        """Collective: metrics without a checkpoint (e.g. an evaluation)."""


class FolderCheckpointer:
    """Checkpoints in `<directory>/step_<n>/` without Ray (one process, or ranks sharing a
    file system); the newest complete one resumes."""

    def __init__(self, directory: Path, keep: int = 2):
        self.directory, self.keep = directory, keep

    def _complete(self) -> list[Path]:
        found = sorted(self.directory.glob("step_*"), key=lambda d: int(d.name.split("_")[1]))
        return [d for d in found if (d / train_state.META).exists()]

    @contextlib.contextmanager
    def latest(self) -> Iterator[Optional[Path]]:
        # rank 0 picks: ranks listing a shared folder on their own may see different newest ones
        done = comm.decided_by_rank_0(self._complete)
        yield done[-1] if done else None

    def save(self, step: int, metrics: dict, write: Callable[[Path], None]) -> None:
        folder = self.directory / f"step_{step:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        write(folder)
        comm.barrier()
        if comm.get_rank() == 0:
            for old in self._complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def report(self, metrics: dict) -> None:
        pass
