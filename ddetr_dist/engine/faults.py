"""Fault injection for tests, from the environment of the workers:

  DDETR_INJECT_NONFINITE_LOSS="STEP[,STEP...][@RANK]"  the loss is NaN at those optimizer
      steps (0-based) on RANK (default: every rank)
  DDETR_INJECT_FP16_OVERFLOW="STEP[,STEP...][@RANK]"   the loss is multiplied by 2**100 at those
      steps, which overflows fp16 gradients at any loss scale > 1
"""
from __future__ import annotations

import os

from ddetr_dist import comm

INJECT_NONFINITE_ENV = "DDETR_INJECT_NONFINITE_LOSS"
INJECT_OVERFLOW_ENV = "DDETR_INJECT_FP16_OVERFLOW"
OVERFLOW_FACTOR = 2.0 ** 100


def injected_steps(env: str) -> set[int]:
    """The steps an injection variable names for this rank."""
    spec = os.environ.get(env, "")
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

    def poisoned(self, step: int) -> bool:
        return step in self.nonfinite_at

    def loss_factor(self, step: int) -> float:
        return OVERFLOW_FACTOR if step in self.overflow_at else 1.0
