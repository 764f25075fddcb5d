"""The levels' (H, W) as Python numbers. The op's official signature carries them as an
int64 tensor [L, 2]; an exported graph carries them as a list of (H, W) pairs instead, the
feature maps' own sizes, so that they stay expressions of the input's height and width
(reading a tensor's values back would freeze them at the example input's)."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

# [L, 2] int64 (H, W) per level, or the same as a list of pairs
SpatialShapes = Union[Tensor, Sequence[Sequence[int]]]


def level_shapes(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    """[(H, W)] per level, from either form."""
    if torch.is_tensor(spatial_shapes):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def level_starts(shapes: Sequence[tuple[int, int]]) -> list[int]:
    """Where each level's tokens start in the flattened sequence."""
    starts, total = [], 0
    for h, w in shapes:
        starts.append(total)
        total = total + h * w
    return starts
