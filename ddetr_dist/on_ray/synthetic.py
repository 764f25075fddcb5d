"""Random images with random boxes for `ddetr bench train --synthetic HxW`: no shards, no
decoding, the model's speed and memory alone."""
from __future__ import annotations

import itertools

import torch

from ddetr_dist.config import Config

OBJECTS_PER_IMAGE = 7  # of a synthetic image: about COCO's mean


def synthetic_batches(cfg: Config, size: tuple[int, int], device: torch.device, distinct: int = 2):
    """Random normalised images of `size` (no padding), each with OBJECTS_PER_IMAGE random
    boxes, made once on `device` and repeated: the steps then time the model alone."""
    generator = torch.Generator().manual_seed(cfg.seed)
    batch_size, (height, width) = cfg.data.batch_size, size
    batches = []
    for _ in range(distinct):
        images = torch.randn(batch_size, 3, height, width, generator=generator)
        targets = []
        for _ in range(batch_size):
            centres = 0.2 + 0.6 * torch.rand(OBJECTS_PER_IMAGE, 2, generator=generator)
            sizes = 0.05 + 0.3 * torch.rand(OBJECTS_PER_IMAGE, 2, generator=generator)
            labels = torch.randint(1, cfg.model.num_classes, (OBJECTS_PER_IMAGE,), generator=generator)
            targets.append({"labels": labels.to(device), "boxes": torch.cat([centres, sizes], -1).to(device)})
        batches.append((images.to(device), torch.zeros(batch_size, height, width, dtype=torch.bool, device=device),
                        targets))
    return itertools.cycle(batches)

