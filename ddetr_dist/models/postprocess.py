"""Model outputs -> detections in the original image's pixels (the format COCO eval wants)."""
from __future__ import annotations

import torch
from torch import nn

from .box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    def __init__(self, num_detections: int = 100):
        super().__init__()
        self.num_detections = num_detections

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """target_sizes [B,2] (h, w) of each original image -> per image {'scores' [K],
        'labels' [K], 'boxes' [K,4] absolute xyxy}, K = min(100, Q*C), best first.
        A query may appear with several classes: classes are scored independently (sigmoid)."""
        scores, labels, boxes = self.batched(outputs["pred_logits"], outputs["pred_boxes"], target_sizes)
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]

    def batched(self, logits: torch.Tensor, boxes: torch.Tensor, target_sizes: torch.Tensor):
        """The same as whole tensors (what an exported graph outputs): scores [B,K], labels
        [B,K], boxes [B,K,4]."""
        if tuple(target_sizes.shape) != (logits.shape[0], 2):
            raise ValueError(f"target_sizes: expected [{logits.shape[0]},2] (h, w) per image, "
                             f"got {tuple(target_sizes.shape)}")
        num_classes = logits.shape[2]
        prob = logits.sigmoid().flatten(1)
        k = min(self.num_detections, prob.shape[1])
        scores, topk_indexes = torch.topk(prob, k, dim=1)
        query_index = topk_indexes // num_classes
        labels = topk_indexes % num_classes
        boxes = torch.gather(box_cxcywh_to_xyxy(boxes), 1, query_index.unsqueeze(-1).repeat(1, 1, 4))
        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(boxes)
        return scores, labels, boxes * scale[:, None, :]
