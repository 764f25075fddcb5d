"""Pure-PyTorch multi-scale deformable attention: the reference every kernel is tested against.

Same math as the official `ms_deform_attn_core_pytorch`: per level, `grid_sample` with
bilinear interpolation, zero padding and align_corners=False, then a weighted sum over
levels and points. Slow and memory-hungry (it materialises every sampled value), but
obviously correct, differentiable in every input, and available everywhere.

Mixed dtypes (autocast gives a bfloat16 value next to float32 locations) are computed in
the widest of the three dtypes and returned in value's dtype, as the kernels do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .levels import SpatialShapes, level_shapes


def ms_deform_attn_torch(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: torch.Tensor | list,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """value [N,S,M,D], sampling_locations [N,Lq,M,L,P,2] in 0..1 (x,y),
    attention_weights [N,Lq,M,L,P] -> [N,Lq,M*D]. `spatial_shapes`: [L,2] (H,W) or a list of
    (H,W) pairs (levels.py); `level_start_index` is implied by them and accepted only to keep
    the official signature. Only standard operators (GridSample from ONNX opset 16): this
    is the formulation `ddetr export` writes."""
    del level_start_index
    out_dtype = value.dtype
    compute_dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype),
                                        attention_weights.dtype)
    value, sampling_locations, attention_weights = (
        t.to(compute_dtype) for t in (value, sampling_locations, attention_weights))
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = level_shapes(spatial_shapes)
    value_list = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants the grid in -1..1
    sampling_grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        value_l = value_list[level].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        grid_l = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear",
                                     padding_mode="zeros", align_corners=False))  # [N*M, D, Lq, P]
    # [N, Lq, M, L, P] -> [N*M, 1, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(N, M * D, Lq)
    return out.transpose(1, 2).contiguous().to(out_dtype)
