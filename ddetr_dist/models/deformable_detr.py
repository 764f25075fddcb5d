"""Deformable DETR: backbone -> per-level input projections -> deformable transformer ->
class and box heads on every decoder layer. Module names and layout follow the official
code, so its checkpoints load with strict=True."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Joiner, downsample_mask
from .box_ops import inverse_sigmoid
from .deformable_transformer import DeformableTransformer
from .encoder import clone_layers

FOCAL_PRIOR_PROB = 0.01  # initial foreground probability of every class logit


class MLP(nn.Module):
    """Linear layers with ReLU between them (the box head: 3 layers, output 4)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


def init_class_head(class_embed: nn.Linear) -> None:
    """Default Linear weights; biases at the focal-loss prior so that early training is not
    swamped by the loss of the many background queries."""
    class_embed.reset_parameters()
    nn.init.constant_(class_embed.bias, -math.log((1 - FOCAL_PRIOR_PROB) / FOCAL_PRIOR_PROB))


def check_inputs(images: torch.Tensor, padding_mask: torch.Tensor) -> None:
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images: expected a tensor [B,3,H,W] (normalised RGB), got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images: expected a floating-point tensor, got {images.dtype}; convert and normalise first")
    b, _, h, w = images.shape
    if not torch.is_tensor(padding_mask) or tuple(padding_mask.shape) != (b, h, w):
        shape = tuple(padding_mask.shape) if torch.is_tensor(padding_mask) else type(padding_mask).__name__
        raise ValueError(f"padding_mask: expected shape {(b, h, w)} (one [H,W] mask per image), got {shape}")
    if padding_mask.dtype != torch.bool:
        raise ValueError(f"padding_mask: expected dtype torch.bool (True = padding), got {padding_mask.dtype}")


class DeformableDETR(nn.Module):
    def __init__(self, backbone: Joiner, transformer: DeformableTransformer, num_classes: int,
                 num_queries: int, num_feature_levels: int, aux_loss: bool = True,
                 with_box_refine: bool = False, two_stage: bool = False):
        super().__init__()
        if two_stage and not with_box_refine:
            raise ValueError("model.two_stage requires model.with_box_refine=true (the official two-stage "
                             "Deformable DETR refines boxes; its encoder proposals use the refinement heads)")
        self.num_queries = num_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        class_embed = nn.Linear(hidden_dim, num_classes)
        init_class_head(class_embed)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        # boxes start as the reference point itself (zero correction)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage

        # One head per decoder layer (+1 scoring encoder proposals in two-stage). Without
        # refinement the official model repeats one shared head, which its state dict then
        # lists once per layer; we keep that layout.
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = clone_layers(class_embed, num_pred)
            self.bbox_embed = clone_layers(bbox_embed, num_pred)
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList(class_embed for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(bbox_embed for _ in range(num_pred))
        if two_stage:
            transformer.decoder.class_embed = self.class_embed
            for box_embed in self.bbox_embed:
                nn.init.constant_(box_embed.layers[-1].bias[2:], 0.0)
        else:
            # per query: position embedding (first half) and content (second half)
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)

        # 1x1 conv + GroupNorm per backbone level; then stride-2 3x3 convs for extra levels
        in_channels = backbone.num_channels
        input_proj = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
                      for c in in_channels]
        extra_in = in_channels[-1]
        for _ in range(num_feature_levels - len(input_proj)):
            input_proj.append(nn.Sequential(nn.Conv2d(extra_in, hidden_dim, kernel_size=3, stride=2, padding=1),
                                            nn.GroupNorm(32, hidden_dim)))
            extra_in = hidden_dim
        self.input_proj = nn.ModuleList(input_proj)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.backbone = backbone

    def reset_class_heads(self) -> None:
        """Fresh class heads (e.g. to fine-tune on a dataset with other classes)."""
        for head in {id(m): m for m in self.class_embed}.values():
            init_class_head(head)

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None) -> dict:
        """images [B,3,H,W] normalised; padding_mask [B,H,W] bool, True = padding (None: no
        padding) -> {'pred_logits' [B,Q,C], 'pred_boxes' [B,Q,4] cxcywh in 0..1 of the
        unpadded image, 'aux_outputs' (earlier decoder layers), 'enc_outputs' (two-stage)}."""
        if padding_mask is None and torch.is_tensor(images) and images.dim() == 4:
            padding_mask = images.new_zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool)
        check_inputs(images, padding_mask)
        return self.detect(*self.multi_scale_features(images, padding_mask))

    def multi_scale_features(self, images: torch.Tensor, padding_mask: torch.Tensor):
        """-> per level: projected maps [B,D,h,w], padding masks [B,h,w], position encodings [B,D,h,w]."""
        features, pos = self.backbone(images, padding_mask)
        srcs = [proj(feature) for proj, (feature, _) in zip(self.input_proj, features)]
        masks = [mask for _, mask in features]
        for level in range(len(srcs), self.num_feature_levels):
            # the first extra level starts from the last backbone map, later ones from the previous level
            src = self.input_proj[level](features[-1][0] if level == len(features) else srcs[-1])
            mask = downsample_mask(padding_mask, src.shape[-2:])
            srcs.append(src)
            masks.append(mask)
            pos.append(self.backbone[1](mask).to(src.dtype))
        return srcs, masks, pos

    def detect(self, srcs: list[torch.Tensor], masks: list[torch.Tensor], pos: list[torch.Tensor]) -> dict:
        """Transformer and heads on the multi-scale features -> the output dict of forward."""
        query_embeds = None if self.two_stage else self.query_embed.weight
        hs, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact = self.transformer(
            srcs, masks, pos, query_embeds)

        outputs_classes, outputs_coords = [], []
        for lvl in range(hs.shape[0]):
            # each layer's boxes are a correction (in logit space) of the reference it attended from
            reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])
            outputs_classes.append(self.class_embed[lvl](hs[lvl]))
            delta = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                coord = delta + reference
            else:
                coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            outputs_coords.append(coord.sigmoid())

        out = {"pred_logits": outputs_classes[-1], "pred_boxes": outputs_coords[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(outputs_classes[:-1], outputs_coords[:-1])]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_outputs_class, "pred_boxes": enc_outputs_coord_unact.sigmoid()}
        return out
