"""Dropout whose mask is cheap on the CPU.

torch's CPU dropout draws one Bernoulli sample per element (about an eighth of a training step
of the base model on a CPU: the transformer drops out every activation it makes). Here four
elements share one 64-bit draw: each gets 16 random bits and is kept when they are at or above
round(p * 2**16). The keep probability is then p rounded to a multiple of 2**-16 (0.1 drops
with probability 0.100006), and kept values are scaled by 1 / (1 - p) as torch does. The mask
is kept as booleans for the backward pass, as torch's own dropout keeps it.

On a GPU, in a compiled graph (inductor draws and fuses its own masks) and in evaluation, this
is torch's dropout."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BITS = 16


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A bool mask of `shape`, True with probability 1 - p (to 2**-16): 16 random bits per element."""
    count = 1
    for size in shape:
        count *= size
    # all 64 bits random: random_() with no range leaves the sign bit 0, which would bias every
    # fourth element
    draws = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)
    bits = draws.view(torch.int16)[:count].view(shape)  # -2**15 .. 2**15 - 1, uniformly
    return bits >= round(p * 2 ** BITS) - 2 ** (BITS - 1)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return F.dropout(x, p, training)
    return _MaskedScale.apply(x, keep_mask(x.shape, p), 1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """nn.Dropout (same state dict: none) with the CPU mask above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
