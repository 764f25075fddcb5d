"""The deformable transformer: flattens the multi-scale feature maps, runs the encoder,
chooses the decoder's queries and reference points (learned, or the encoder's top-k
proposals in two-stage mode) and runs the decoder. Same math as the official code."""
from __future__ import annotations

import math

import torch
from torch import nn

from ddetr_dist.ops import MSDeformAttn
from ddetr_dist.ops.levels import level_shapes, level_starts

from .decoder import DeformableTransformerDecoder, DeformableTransformerDecoderLayer
from .encoder import DeformableTransformerEncoder, DeformableTransformerEncoderLayer


def get_valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of each padded map [B,H,W] covered by the image -> [B,2] (w, h)."""
    _, h, w = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


class DeformableTransformer(nn.Module):
    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 num_feature_levels: int = 4, dec_n_points: int = 4, enc_n_points: int = 4,
                 two_stage: bool = False, two_stage_num_proposals: int = 300,
                 activation_checkpointing: bool = False, msda_backend: str | None = None):
        super().__init__()
        self.d_model = d_model
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        encoder_layer = DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                          nhead, enc_n_points, msda_backend)
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers, activation_checkpointing)
        decoder_layer = DeformableTransformerDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                          nhead, dec_n_points, msda_backend)
        self.decoder = DeformableTransformerDecoder(decoder_layer, num_decoder_layers, activation_checkpointing)
        # which level a token comes from, added to its position encoding
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self):
        # Xavier for every matrix except the deformable attention's, which keep their own
        # init (each head starts sampling in its own direction).
        msda_params = {id(p) for m in self.modules() if isinstance(m, MSDeformAttn) for p in m.parameters()}
        for p in self.parameters():
            if p.dim() > 1 and id(p) not in msda_params:
                nn.init.xavier_uniform_(p)
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def get_proposal_pos_embed(self, proposals: torch.Tensor) -> torch.Tensor:
        """Sine embedding of proposal boxes (logits) [B,K,4] -> [B,K,2*d_model]."""
        num_pos_feats = self.d_model // 2
        temperature = 10000
        scale = 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
        pos = (proposals.sigmoid() * scale)[:, :, :, None] / dim_t
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def gen_encoder_output_proposals(self, memory, memory_padding_mask, spatial_shapes):
        """One proposal per encoder token: a box centred on its pixel, 0.05 * 2^level wide.
        -> (projected memory [B,S,D], proposal logits [B,S,4]; inf where padded or the box
        reaches the image border, and there the memory is zeroed)."""
        n, _, _ = memory.shape
        proposals = []
        start = 0
        for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
            mask_flatten_ = memory_padding_mask[:, start:start + h * w].view(n, h, w, 1)
            valid_h = torch.sum(~mask_flatten_[:, :, 0, 0], 1)
            valid_w = torch.sum(~mask_flatten_[:, 0, :, 0], 1)
            # arange: the official linspace(0, h - 1, h) to the bit, exportable (encoder.py)
            grid_y, grid_x = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=memory.device),
                                            torch.arange(w, dtype=torch.float32, device=memory.device),
                                            indexing="ij")
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
            proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
            start += h * w
        output_proposals = torch.cat(proposals, 1)
        output_proposals_valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        output_proposals = output_proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float("inf"))
        output_proposals = output_proposals.masked_fill(~output_proposals_valid, float("inf"))

        output_memory = memory.masked_fill(memory_padding_mask.unsqueeze(-1), 0.0)
        output_memory = output_memory.masked_fill(~output_proposals_valid, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, output_proposals

    def forward(self, srcs, masks, pos_embeds, query_embed=None):
        """srcs/pos_embeds [[B,D,h,w]] and masks [[B,h,w]] per level; query_embed
        [Q, 2*D] (position half, content half) unless two-stage ->
        (hidden states [layers,B,Q,D], initial references [B,Q,2|4], per-layer references
        [layers,B,Q,2|4], encoder class logits [B,S,C] | None, encoder box logits [B,S,4] | None)."""
        if not self.two_stage and query_embed is None:
            raise ValueError("DeformableTransformer: query_embed is required unless two_stage")
        src_flatten, mask_flatten, lvl_pos_embed_flatten, spatial_shapes = [], [], [], []
        for lvl, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
            spatial_shapes.append(src.shape[-2:])
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            lvl_pos_embed_flatten.append(pos_embed.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        lvl_pos_embed_flatten = torch.cat(lvl_pos_embed_flatten, 1)
        if torch.compiler.is_exporting() or torch.compiler.is_compiling():
            # the levels' sizes as expressions of the input's height and width (ops/levels.py);
            # compiled, a tensor's values read back (.tolist()) would break the graph at every layer
            spatial_shapes = [(h, w) for h, w in spatial_shapes]
            level_start_index = level_starts(spatial_shapes)
        else:
            spatial_shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=src_flatten.device)
            level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([get_valid_ratio(m) for m in masks], 1)

        memory = self.encoder(src_flatten, spatial_shapes, level_start_index, valid_ratios,
                              lvl_pos_embed_flatten, mask_flatten)

        bs, _, c = memory.shape
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            output_memory, output_proposals = self.gen_encoder_output_proposals(memory, mask_flatten, spatial_shapes)
            # the extra (last) class/box heads score and refine every token's proposal
            enc_outputs_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
            enc_outputs_coord_unact = self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + output_proposals
            # (an exported graph keeps no Python check: there the top-k below fails instead)
            if not torch.compiler.is_exporting() and output_proposals.shape[1] < self.two_stage_num_proposals:
                raise ValueError(f"two-stage: the image gives {output_proposals.shape[1]} encoder tokens, fewer than "
                                 f"the {self.two_stage_num_proposals} proposals (model.num_queries) to choose; "
                                 "use larger images or fewer queries")
            # Rank by the first logit: the encoder is trained class-agnostic (all labels 0).
            # Deviation from the official code: padding tokens are never ranked above image
            # tokens. Their memory is zeroed, so they all share one score; the official top-k
            # may pick them, which makes the predictions depend on how much an image was padded.
            scores = enc_outputs_class[..., 0].masked_fill(mask_flatten, float("-inf"))
            topk_proposals = torch.topk(scores, self.two_stage_num_proposals, dim=1)[1]
            topk_coords_unact = torch.gather(enc_outputs_coord_unact, 1,
                                             topk_proposals.unsqueeze(-1).repeat(1, 1, 4)).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans_out = self.pos_trans_norm(self.pos_trans(self.get_proposal_pos_embed(topk_coords_unact)))
            query_embed, tgt = torch.split(pos_trans_out, c, dim=2)
        else:
            query_embed, tgt = torch.split(query_embed, c, dim=1)
            query_embed = query_embed.unsqueeze(0).expand(bs, -1, -1)
            tgt = tgt.unsqueeze(0).expand(bs, -1, -1)
            reference_points = self.reference_points(query_embed).sigmoid()
        init_reference_out = reference_points

        hs, inter_references = self.decoder(tgt, reference_points, memory, spatial_shapes, level_start_index,
                                            valid_ratios, query_embed, mask_flatten)
        return hs, init_reference_out, inter_references, enc_outputs_class, enc_outputs_coord_unact
