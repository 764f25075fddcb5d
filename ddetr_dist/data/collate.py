"""Batch (image [3,h,w], target) pairs of different sizes: pad every image to the
largest height and width in the batch (zeros after normalisation, as official) and mark
the padding in a mask (True = padding), which the model uses to ignore it.

`pad_to_multiple` rounds that height and width up to a multiple (data.pad_to_multiple): a
compiled model then meets a few shape buckets instead of every random size. The mask keeps
the extra padding out of the encoder's attention and the losses, but not exactly out of the
outputs: convolutions, BatchNorm and the attention's bilinear sampling near the image's edge
see the extra zeros, as they see the padding of a batch's smaller images (docs/training.md)."""
from __future__ import annotations

from typing import Sequence

import torch


def collate(samples: Sequence[tuple[torch.Tensor, dict]],
            pad_to_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """-> images float [B,3,H,W], padding_mask bool [B,H,W] (True = padding), targets; H and
    W multiples of `pad_to_multiple`."""
    if not samples:
        raise ValueError("collate: empty batch")
    height = max(image.shape[1] for image, _ in samples)
    width = max(image.shape[2] for image, _ in samples)
    multiple = max(1, pad_to_multiple)
    height, width = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    # empty + zeroing only the padding: a third faster than zeros + copy on full-size images
    images = torch.empty(len(samples), 3, height, width, dtype=samples[0][0].dtype)
    padding_mask = torch.ones(len(samples), height, width, dtype=torch.bool)
    for i, (image, _) in enumerate(samples):
        h, w = image.shape[1:]
        images[i, :, :h, :w] = image
        images[i, :, h:, :] = 0
        images[i, :, :h, w:] = 0
        padding_mask[i, :h, :w] = False
    return images, padding_mask, [target for _, target in samples]
