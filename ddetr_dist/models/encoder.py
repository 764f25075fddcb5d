"""The deformable encoder: every pixel of every level attends to a few sampled points
around itself on all levels (multi-scale deformable self-attention), then an FFN."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ddetr_dist.ops import MSDeformAttn
from ddetr_dist.ops.levels import SpatialShapes, level_shapes

from .dropout import Dropout


def clone_layers(layer: nn.Module, n: int) -> nn.ModuleList:
    """n independent copies (same initial weights), as the official _get_clones."""
    return nn.ModuleList([copy.deepcopy(layer) for _ in range(n)])


def with_pos_embed(tensor: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return tensor if pos is None else tensor + pos


class DeformableTransformerEncoderLayer(nn.Module):
    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, msda_backend: str | None = None):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=msda_backend)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = nn.ReLU()
        self.dropout2 = Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        src2 = self.self_attn(with_pos_embed(src, pos), reference_points, src, spatial_shapes,
                              level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, encoder_layer: DeformableTransformerEncoderLayer, num_layers: int,
                 activation_checkpointing: bool = False):
        super().__init__()
        self.layers = clone_layers(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.activation_checkpointing = activation_checkpointing

    @staticmethod
    def get_reference_points(spatial_shapes: SpatialShapes, valid_ratios: torch.Tensor,
                             device: torch.device) -> torch.Tensor:
        """The centre of every pixel of every level, normalised by the valid part of its own
        level and then mapped onto every level: [B, S, L, 2] (x, y) in padded-map units."""
        reference_points_list = []
        for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
            # arange + 0.5 is the official linspace(0.5, h - 0.5, h) to the bit, and stays an
            # expression of h in an exported graph (linspace's step count does not)
            ref_y, ref_x = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                                          torch.arange(w, dtype=torch.float32, device=device) + 0.5,
                                          indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            reference_points_list.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(reference_points_list, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos=None, padding_mask=None):
        output = src
        reference_points = self.get_reference_points(spatial_shapes, valid_ratios, device=src.device)
        for layer in self.layers:
            args = (output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
            if self.activation_checkpointing and self.training:
                # keep only the layer inputs; recompute its activations in backward
                output = checkpoint(layer, *args, use_reentrant=False)
            else:
                output = layer(*args)
        return output
