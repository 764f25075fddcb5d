"""ZeRO-0 on a CPU: the gradients of a step are freed right before the next step's first
backward, not right after the update.

DeepSpeed's `engine.step()` frees every gradient (`param.grad = None`) as soon as the
optimizer has used them. On a CPU that memory goes back to the system (glibc's malloc
returns large freed blocks), and the next backward, which allocates the gradients again after
a whole forward in between, takes a page fault for each fresh page: about 7,000 a step for the demo model, 5% of its step (measured:
9,000 minor faults a step against 2,000 for a plain PyTorch loop that frees them after the
forward, right before the backward, as torch's examples do; freeing there too brings the
engine's step to the plain loop's time). So DeepSpeed's `zero_grad` only marks the
gradients as stale here, and the step frees them before its first backward.

Nothing reads a gradient between a step and the next backward (checkpoints and evaluation
read the weights), and a stale gradient is never accumulated into: it is gone before the
backward that would add to it. On a GPU, CUDA's caching allocator reuses freed blocks
without faults, and freeing early lowers the peak memory of the forward: left as DeepSpeed
does it there. ZeRO-1/2/3 keep their gradients in their optimizer's own buffers."""
from __future__ import annotations

import torch


class StaleGradients:
    """`free_before_backward()` before each `engine.backward`; `engine.zero_grad()` (DeepSpeed's
    step calls it after the update, the loop after a skipped step) marks the gradients stale."""

    def __init__(self, engine, enabled: bool):
        self.module, self.enabled, self.stale = engine.module, enabled, False
        if enabled:
            engine.zero_grad = self.mark

    def mark(self) -> None:
        self.stale = True

    def free_before_backward(self) -> None:
        if self.stale:
            self.module.zero_grad(set_to_none=True)
            self.stale = False


def frees_late(zero_stage: int, device: torch.device) -> bool:
    """Whether the engine's gradients are freed before the next backward (see above)."""
    return zero_stage == 0 and device.type == "cpu"
