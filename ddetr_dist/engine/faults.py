"""Fault injection for tests, from the environment of the workers:

  DDETR_INJECT_NONFINITE_LOSS="STEP[,STEP...][@RANK]"  the loss is NaN at those optimizer
      steps (0-based) on RANK (default: every rank)
  DDETR_INJECT_FP16_OVERFLOW="STEP[,STEP...][@RANK]"   the loss is multiplied by 2**100 at those
      steps, which overflows fp16 gradients at any loss scale > 1
  DDETR_INJECT_SLOW_SAVE="STEP[,STEP...][@RANK]:MARKER"  the write of the checkpoints of those
      steps waits SLOW_SAVE_S before writing anything, once: it creates the file MARKER first
      (a test waits for it: the save is pending now), and a save that finds MARKER there (the
      run restarted) does not wait. In the background, unless train.async_checkpoint=false:
      then the loop waits too
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ddetr_dist import comm

INJECT_NONFINITE_ENV = "DDETR_INJECT_NONFINITE_LOSS"
INJECT_OVERFLOW_ENV = "DDETR_INJECT_FP16_OVERFLOW"
INJECT_SLOW_SAVE_ENV = "DDETR_INJECT_SLOW_SAVE"
OVERFLOW_FACTOR = 2.0 ** 100
SLOW_SAVE_S = 600.0


def injected_steps(env: str) -> set[int]:
    """The steps an injection variable names for this rank."""
    return steps_for_this_rank(os.environ.get(env, ""))


def steps_for_this_rank(spec: str) -> set[int]:
    """'STEP[,STEP...][@RANK]' -> the steps, if this is RANK (or no rank is named)."""
    if not spec:
        return set()
    steps, _, rank = spec.partition("@")
    if rank and int(rank) != comm.get_rank():
        return set()
    return {int(s) for s in steps.split(",") if s}


class InjectedFaults:
    """Read once, when the trainer is built (after the process group, which names the rank)."""

    def __init__(self):
        self.nonfinite_at = injected_steps(INJECT_NONFINITE_ENV)
        self.overflow_at = injected_steps(INJECT_OVERFLOW_ENV)
        spec, _, marker = os.environ.get(INJECT_SLOW_SAVE_ENV, "").partition(":")
        if spec and not marker:
            raise ValueError(f"{INJECT_SLOW_SAVE_ENV}={spec!r}: name the marker file, STEP[@RANK]:MARKER")
        self.slow_save_at, self.slow_save_marker = steps_for_this_rank(spec), Path(marker)

    def poisoned(self, step: int) -> bool:
        return step in self.nonfinite_at

    def loss_factor(self, step: int) -> float:
        return OVERFLOW_FACTOR if step in self.overflow_at else 1.0

    def before_save_write(self, step: int) -> None:
        """In the checkpoint writer's thread, before it writes the checkpoint of `step`."""
        if step in self.slow_save_at and not self.slow_save_marker.exists():
            self.slow_save_marker.touch()
            time.sleep(SLOW_SAVE_S)
