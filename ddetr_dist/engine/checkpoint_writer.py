"""Writes a checkpoint while the training goes on: the loop takes a CPU copy of the state
(train_state.snapshot, the only part it waits for), then hands the rest (portable.pt,
meta.json last, registering the checkpoint with the checkpointer) to one thread here.

At most one save is pending: the next save, an evaluation, the end of the run and the
final model wait for it first (`wait`), so saves complete in order and a checkpoint is
registered only once all of its files are written. The loop looks after each step
(`poll`): a save that completed is announced then, in the loop's thread (`on_complete`: the
"checkpoint" record, which thus means written and registered), and an error in the thread
is raised, never dropped. The thread is not a daemon: a process that exits (even on an
error elsewhere) finishes a pending save first, which meta.json then marks complete.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from ddetr_dist.engine import train_state


class CheckpointWriteError(RuntimeError):
    """Writing or registering a checkpoint in the background failed."""


class CheckpointWriter:
    """`submit(step, job)`: run `job` (no collective of the loop's process group in it) in the
    background, or at once when `background` is False (train.async_checkpoint: false)."""

    def __init__(self, background: bool = True, on_complete: Optional[Callable[[dict, float, float], None]] = None):
        self.background = background
        # (the save's {"step", "epoch", ...}, seconds the loop waited, seconds writing), in the loop's thread
        self.on_complete = on_complete
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._step: Optional[int] = None  # of the pending or last save
        self._unannounced: Optional[tuple[dict, float]] = None  # (what, stall) of a save not yet announced
        self.last_write_s: float = 0.0  # how long the last job took (in the thread)

    @property
    def pending(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def save(self, checkpointer, engine, optimizer, progress: train_state.Progress, metrics: dict,
             before_write: Callable[[int], None] = lambda step: None) -> float:
        """Collective: after the pending save, every rank takes its part of the state
        (train_state.snapshot); writing it and registering it with `checkpointer`
        (engine/checkpointers.py) go to the thread. -> the seconds the loop waited.
        `before_write(step)`: run in the thread first (fault injection: engine/faults.py)."""
        self.wait()  # the previous save complete and registered first: in order
        start = time.perf_counter()
        folder = checkpointer.folder(progress.step)
        write_rest = train_state.snapshot(folder, engine, optimizer, progress)
        step = progress.step

        def write_and_register() -> None:  # only the CPU group's collective: it may run in the thread
            before_write(step)
            write_rest()
            checkpointer.register(folder, step, metrics)

        snapshot_s = time.perf_counter() - start
        self.submit(step, write_and_register, stall_s=snapshot_s, what=metrics)
        return time.perf_counter() - start

    def submit(self, step: int, job: Callable[[], None], stall_s: float = 0.0, what: Optional[dict] = None) -> None:
        self.wait()  # one save at a time: they complete (and register) in order
        self._step, self._unannounced = step, (what or {"step": step}, stall_s)
        if not self.background:
            self._run(job)
            self._settle()
            return
        self._thread = threading.Thread(target=self._run, args=(job,), name=f"checkpoint-writer-{step}")
        self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        start = time.perf_counter()
        try:
            job()
        except BaseException as error:  # raised in the loop by poll or wait
            self._error = error
        self.last_write_s = time.perf_counter() - start

    def wait(self) -> None:
        """Until the pending save is written and registered; raises its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._settle()

    def poll(self) -> None:
        """(After each step.) A save that finished is announced, or its error raised."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()
        elif self._thread is None:
            self._settle()

    def _settle(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            self._unannounced = None
            raise CheckpointWriteError(f"writing the checkpoint of step {self._step} failed: "
                                       f"{type(error).__name__}: {error}") from error
        done, self._unannounced = self._unannounced, None
        if done is not None and self.on_complete is not None:
            what, stall_s = done  # saved without a thread: the loop also waited for the write
            self.on_complete(what, stall_s + (0.0 if self.background else self.last_write_s), self.last_write_s)
