"""The backbone as the official code lays it out: `backbone.0` is the ResNet (`.body`) with
frozen stem and layer1, `backbone.1` the position encoding; the pair is the Joiner."""
from __future__ import annotations

import torch
from torch import nn

from .position_encoding import PositionEmbeddingSine
from .resnet import FrozenBatchNorm2d, ResNet, trainable_batch_norm, unfreeze_batch_norm

NORMS = ("frozen_bn", "bn")
# parameter-name prefixes of the ResNet stages, in order: stem, layer1 .. layer4
STAGES = (("conv1.", "bn1."), ("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",))


def nearest_indexes(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """The source row (column) of each of `out_size` rows under nearest resizing: torch's own
    arithmetic (float32 scale in/out, floor), written out so that an exported graph computes
    it too (ONNX Resize rounds otherwise, and moves a padded map's edge by a pixel)."""
    scale = torch.full((), in_size, dtype=torch.float32, device=device) / out_size
    index = (torch.arange(out_size, dtype=torch.float32, device=device) * scale).floor().long()
    return index.clamp(max=in_size - 1)


def downsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Padding mask [B,H,W] at a feature map's size: nearest, as the official code's
    F.interpolate(mask[None].float(), size) (the same pixels, to the bit)."""
    rows = nearest_indexes(mask.shape[1], size[0], mask.device)
    cols = nearest_indexes(mask.shape[2], size[1], mask.device)
    return mask[:, rows][:, :, cols]


class Backbone(nn.Module):
    """ResNet returning the last `num_outputs` of C3, C4, C5 with their padding masks."""

    def __init__(self, depth: int = 50, num_outputs: int = 3, dilation: bool = False, norm: str = "frozen_bn",
                 frozen_stages: int = 2):
        super().__init__()
        if not 1 <= num_outputs <= 3:
            raise ValueError(f"Backbone: num_outputs must be 1..3 (C3-C5), got {num_outputs}")
        if norm not in NORMS:
            raise ValueError(f"model.backbone_norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if not 0 <= frozen_stages <= len(STAGES):
            raise ValueError(f"model.backbone_frozen_stages must be 0..{len(STAGES)}, got {frozen_stages}")
        self.body = ResNet(depth, dilate_last_stage=dilation)
        # The official recipe keeps the stem and layer1 at their ImageNet weights: low-level
        # filters generalise and freezing them saves memory. From scratch, train them all.
        frozen = tuple(prefix for stage in STAGES[:frozen_stages] for prefix in stage)
        for name, parameter in self.body.named_parameters():
            if name.startswith(frozen):
                parameter.requires_grad_(False)
        if norm == "bn":  # trainable BatchNorm in the trained stages; frozen ones stay frozen
            for prefix in (p for stage in STAGES[frozen_stages:] for p in stage):
                name = prefix.rstrip(".")
                child = getattr(self.body, name)
                if isinstance(child, FrozenBatchNorm2d):
                    setattr(self.body, name, trainable_batch_norm(child))
                else:
                    unfreeze_batch_norm(child)
        self.num_outputs = num_outputs
        strides = [8, 16, 16 if dilation else 32]
        self.strides = strides[3 - num_outputs:]
        self.num_channels = self.body.num_channels[3 - num_outputs:]

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        features = self.body(images)[3 - self.num_outputs:]
        return [(f, downsample_mask(mask, f.shape[-2:])) for f in features]


class Joiner(nn.Sequential):
    """backbone.0 = Backbone, backbone.1 = position encoding (the official module indices)."""

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine):
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        """-> features [(map [B,C,h,w], mask [B,h,w])], position encodings [[B,D,h,w]]."""
        features = self[0](images, mask)
        pos = [self[1](m).to(f.dtype) for f, m in features]
        return features, pos
