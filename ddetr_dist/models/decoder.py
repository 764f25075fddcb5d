"""The deformable decoder: object queries attend to each other (ordinary multi-head
self-attention), then to a few sampled points of the encoder memory around their reference
point (multi-scale deformable cross-attention), then an FFN. With box refinement each layer
moves the reference boxes by its own box head's prediction."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ddetr_dist.ops import MSDeformAttn

from .box_ops import inverse_sigmoid
from .dropout import Dropout
from .encoder import clone_layers, with_pos_embed


class DeformableTransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, msda_backend: str | None = None):
        super().__init__()
        # registration order = the official state-dict order
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=msda_backend)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = nn.ReLU()
        self.dropout3 = Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, src, src_spatial_shapes, level_start_index,
                src_padding_mask=None):
        q = k = with_pos_embed(tgt, query_pos)
        tgt2 = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(with_pos_embed(tgt, query_pos), reference_points, src, src_spatial_shapes,
                               level_start_index, src_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableTransformerDecoder(nn.Module):
    def __init__(self, decoder_layer: DeformableTransformerDecoderLayer, num_layers: int,
                 activation_checkpointing: bool = False):
        super().__init__()
        self.layers = clone_layers(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.activation_checkpointing = activation_checkpointing
        # Set by DeformableDETR (the official layout, hence these state-dict names): the
        # per-layer box heads with box refinement, the class heads with two-stage.
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(self, tgt, reference_points, src, src_spatial_shapes, src_level_start_index,
                src_valid_ratios, query_pos=None, src_padding_mask=None):
        """reference_points [B,Q,2] points or [B,Q,4] boxes in 0..1 of the valid image ->
        (hidden states [num_layers,B,Q,D], reference points used by each next layer [num_layers,B,Q,2|4])."""
        output = tgt
        intermediate, intermediate_reference_points = [], []
        for lid, layer in enumerate(self.layers):
            # valid-image coordinates -> padded-map coordinates, per level
            if reference_points.shape[-1] == 4:
                reference_points_input = (reference_points[:, :, None]
                                          * torch.cat([src_valid_ratios, src_valid_ratios], -1)[:, None])
            else:
                reference_points_input = reference_points[:, :, None] * src_valid_ratios[:, None]
            args = (output, query_pos, reference_points_input, src, src_spatial_shapes,
                    src_level_start_index, src_padding_mask)
            if self.activation_checkpointing and self.training:
                output = checkpoint(layer, *args, use_reentrant=False)
            else:
                output = layer(*args)

            if self.bbox_embed is not None:
                # iterative refinement: predict a correction in logit space; the next layer's
                # reference is detached so each layer's box head learns its own step
                delta = self.bbox_embed[lid](output)
                if reference_points.shape[-1] == 4:
                    new_reference_points = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    new_reference_points = torch.cat(
                        [delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1).sigmoid()
                reference_points = new_reference_points.detach()

            intermediate.append(output)
            intermediate_reference_points.append(reference_points)
        return torch.stack(intermediate), torch.stack(intermediate_reference_points)
