"""Collate pads to the largest image and marks exactly the padding in the mask."""
from __future__ import annotations

import pytest
import torch

from ddetr_dist.data.collate import collate


def test_pads_to_the_largest_sides_and_masks_only_the_padding():
    shapes = [(30, 50), (45, 20), (10, 10)]
    samples = [(torch.randn(3, h, w), {"image_id": torch.tensor([i])}) for i, (h, w) in enumerate(shapes)]
    images, mask, targets = collate(samples)
    height, width = max(h for h, _ in shapes), max(w for _, w in shapes)
    assert images.shape == (3, 3, height, width) and mask.shape == (3, height, width)
    assert mask.dtype == torch.bool
    for i, ((image, target), (h, w)) in enumerate(zip(samples, shapes)):
        assert torch.equal(images[i, :, :h, :w], image)
        assert not mask[i, :h, :w].any()
        assert mask[i].sum() == height * width - h * w
        assert (images[i][:, mask[i]] == 0).all()  # padding is zero, as official
        assert targets[i] is target


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError):
        collate([])
