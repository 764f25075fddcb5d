"""MSDeformAttn: the multi-scale deformable attention layer, with the official parameter
names (sampling_offsets, attention_weights, value_proj, output_proj) and initialisation,
so that released Deformable DETR checkpoints load unchanged."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.init import constant_, xavier_uniform_

from .checks import check_levels, check_rank, check_same_device, check_token_count
from .dispatch import ms_deform_attn
from .levels import SpatialShapes


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Under autocast the projections come out in bfloat16/float16; sampling locations
    and the softmax are computed in float32 (bfloat16 locations are ~0.5 px off on a
    152 px map). float64 stays float64."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _width_height(spatial_shapes: SpatialShapes) -> torch.Tensor:
    """[L, 2] (W, H) per level, from either form of the levels' shapes (levels.py)."""
    if torch.is_tensor(spatial_shapes):
        return torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
    return torch.tensor([[w, h] for h, w in spatial_shapes])


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 backend: str | None = None):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        # Official init: each head starts looking in its own direction, points at growing
        # distances along it, equal attention weights.
        constant_(self.sampling_offsets.weight.data, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0]).view(
            self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias = nn.Parameter(grid_init.view(-1))
        constant_(self.attention_weights.weight.data, 0.0)
        constant_(self.attention_weights.bias.data, 0.0)
        xavier_uniform_(self.value_proj.weight.data)
        constant_(self.value_proj.bias.data, 0.0)
        xavier_uniform_(self.output_proj.weight.data)
        constant_(self.output_proj.bias.data, 0.0)

    def check_inputs(self, query, reference_points, input_flatten, input_spatial_shapes,
                     input_level_start_index, input_padding_mask=None) -> None:
        """Raise a ValueError naming the first input that does not fit (see forward)."""
        who, c, levels = "MSDeformAttn", self.d_model, self.n_levels
        check_rank(who, "query", query, f"[N, Lq, d_model={c}]")
        check_rank(who, "input_flatten", input_flatten, f"[N, S, d_model={c}]")
        check_rank(who, "reference_points", reference_points, f"[N, Lq, n_levels={levels}, 2 or 4]")
        n, queries, _ = query.shape
        if query.shape[-1] != c:
            raise ValueError(f"{who}: query must be [N, Lq, d_model={c}], got shape {tuple(query.shape)}")
        if input_flatten.shape[0] != n or input_flatten.shape[-1] != c:
            raise ValueError(f"{who}: input_flatten must be [N={n}, S, d_model={c}] (N from query), "
                             f"got shape {tuple(input_flatten.shape)}")
        if tuple(reference_points.shape[:3]) != (n, queries, levels) or reference_points.shape[3] not in (2, 4):
            raise ValueError(f"{who}: reference_points must be [N={n}, Lq={queries}, n_levels={levels}, 2 or 4] "
                             f"(points x, y or boxes cx, cy, w, h), got shape {tuple(reference_points.shape)}")
        if input_padding_mask is not None and (input_padding_mask.dtype != torch.bool or tuple(
                input_padding_mask.shape) != (n, input_flatten.shape[1])):
            raise ValueError(f"{who}: input_padding_mask must be a bool tensor [N, S] = {(n, input_flatten.shape[1])} "
                             f"(True = padding), got {input_padding_mask.dtype} of shape "
                             f"{tuple(input_padding_mask.shape)}")
        check_same_device(who, {"query": query, "reference_points": reference_points,
                                "input_flatten": input_flatten, "input_padding_mask": input_padding_mask})
        names = {"shapes_name": "input_spatial_shapes", "index_name": "input_level_start_index"}
        check_levels(who, input_spatial_shapes, input_level_start_index, levels, query.device,
                     levels_label="n_levels", **names)
        check_token_count(who, "input_flatten", input_flatten.shape[1], input_spatial_shapes,
                          input_level_start_index, **names)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes,
                input_level_start_index, input_padding_mask=None):
        """query [N,Lq,C]; reference_points [N,Lq,L,2] in 0..1 (x,y) or [N,Lq,L,4] boxes
        (cx,cy,w,h); input_flatten [N,S,C]; input_spatial_shapes [L,2] (H,W) integer
        (or a list of (H,W) pairs: ops/levels.py);
        input_level_start_index [L]; input_padding_mask [N,S] bool, True = padding
        -> [N,Lq,C]. Under autocast the output has the autocast dtype (output_proj is a
        Linear); sampling locations and attention weights are float32 either way."""
        self.check_inputs(query, reference_points, input_flatten, input_spatial_shapes,
                          input_level_start_index, input_padding_mask)
        N, Len_q, _ = query.shape
        _, Len_in, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, Len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = _at_least_float32(self.sampling_offsets(query)).view(
            N, Len_q, self.n_heads, self.n_levels, self.n_points, 2)
        attention_weights = _at_least_float32(self.attention_weights(query)).view(
            N, Len_q, self.n_heads, self.n_levels * self.n_points)
        attention_weights = attention_weights.softmax(-1).view(
            N, Len_q, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by that level's (W, H)
            offset_normalizer = _width_height(input_spatial_shapes).to(sampling_offsets)
            sampling_locations = (reference_points[:, :, None, :, None, :]
                                  + sampling_offsets / offset_normalizer[None, None, None, :, None, :])
        else:  # boxes: offsets are in units of half the box size, per point
            sampling_locations = (reference_points[:, :, None, :, None, :2]
                                  + sampling_offsets / self.n_points
                                  * reference_points[:, :, None, :, None, 2:] * 0.5)
        output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index,
                                sampling_locations, attention_weights, backend=self.backend)
        return self.output_proj(output)
