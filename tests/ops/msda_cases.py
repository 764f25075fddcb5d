"""Inputs for the MSDA op tests: random values, sampling locations that include the
awkward places (outside the map, exactly on its borders, on pixel centres), and
attention weights that sum to one per query and head."""
from __future__ import annotations

import torch

DIFFERENTIABLE = ("value", "sampling_locations", "attention_weights")


def level_tensors(shapes) -> tuple[torch.Tensor, torch.Tensor]:
    """spatial_shapes [L, 2] (H, W) and level_start_index [L], int64, as the model builds them."""
    spatial_shapes = torch.tensor(shapes, dtype=torch.long).view(-1, 2)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def border_coordinates(size: int) -> torch.Tensor:
    """Normalised coordinates on a map of `size` pixels where the bilinear weights change
    regime: the map's edges, the first/last pixel centres, and the lines where the first
    and last corner leave the map (pixel -1 and `size`)."""
    return torch.tensor([0.0, 1.0, 0.5 / size, 1 - 0.5 / size, -0.5 / size, 1 + 0.5 / size, 0.5])


def make_inputs(n: int = 2, queries: int = 5, heads: int = 2, channels: int = 8,
                shapes=((6, 4), (3, 5)), points: int = 3, dtype: torch.dtype = torch.float64,
                seed: int = 0, low: float = -0.2, high: float = 1.2, borders: bool = False) -> dict:
    """Keyword arguments of ms_deform_attn. Locations are uniform in [low, high] (so some
    fall off the map); with borders=True, every other point of each level is moved onto
    that level's border_coordinates instead."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index = level_tensors(shapes)
    levels, tokens = len(spatial_shapes), int(spatial_shapes.prod(1).sum())
    locations = low + (high - low) * torch.rand(n, queries, heads, levels, points, 2, generator=gen, dtype=torch.float64)
    if borders:
        for level, (h, w) in enumerate(spatial_shapes.tolist()):
            for axis, size in ((0, w), (1, h)):
                special = border_coordinates(size).to(torch.float64)
                pick = torch.randint(len(special), (n, queries, heads, (points + 1) // 2), generator=gen)
                locations[:, :, :, level, ::2, axis] = special[pick]
    weights = torch.rand(n, queries, heads, levels * points, generator=gen, dtype=torch.float64) + 0.1
    weights = (weights / weights.sum(-1, keepdim=True)).view(n, queries, heads, levels, points)
    value = torch.randn(n, tokens, heads, channels, generator=gen, dtype=torch.float64)
    return {"value": value.to(dtype), "spatial_shapes": spatial_shapes, "level_start_index": level_start_index,
            "sampling_locations": locations.to(dtype), "attention_weights": weights.to(dtype)}


def with_grad(inputs: dict) -> dict:
    """A copy whose differentiable inputs are fresh leaves that require grad."""
    return {k: v.detach().clone().requires_grad_(k in DIFFERENTIABLE) for k, v in inputs.items()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
