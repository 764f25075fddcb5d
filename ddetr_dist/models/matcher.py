"""Hungarian matching of predictions to ground truth: each target gets the one query that
minimises a weighted sum of a focal classification cost, the L1 box distance and -GIoU."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("loss.set_cost_class/set_cost_bbox/set_cost_giou: at least one must be non-zero")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(self, outputs: dict, targets: list[dict]) -> torch.Tensor:
        """-> [B, Q, total targets of the batch] (each image's block is used for that image)."""
        out_prob = outputs["pred_logits"].flatten(0, 1).sigmoid()
        out_bbox = outputs["pred_boxes"].flatten(0, 1)
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_bbox = torch.cat([t["boxes"] for t in targets])
        # focal cost: how much the focal loss would drop if the query took the target's class
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_cost_class = (1 - alpha) * (out_prob ** gamma) * (-(1 - out_prob + 1e-8).log())
        pos_cost_class = alpha * ((1 - out_prob) ** gamma) * (-(out_prob + 1e-8).log())
        cost_class = pos_cost_class[:, tgt_ids] - neg_cost_class[:, tgt_ids]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return cost.view(*outputs["pred_logits"].shape[:2], -1)

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """outputs: pred_logits [B,Q,C], pred_boxes [B,Q,4]; targets: per image labels [K],
        boxes [K,4] cxcywh -> per image (query indices, target indices), int64, min(Q,K) each."""
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(self, layers: list[dict], targets: list[dict]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """`forward` for each of several outputs against the same targets (the decoder's layers):
        one cost computation and one copy to the host for all of them, not one per layer."""
        stacked = {key: torch.cat([outputs[key] for outputs in layers]) for key in ("pred_logits", "pred_boxes")}
        cost = self.cost_matrix(stacked, targets).float().cpu()  # [layers x B, Q, all targets]
        if not torch.isfinite(cost).all():
            raise FloatingPointError("HungarianMatcher: the predictions contain NaN or inf (has training diverged? "
                                     "try a lower learning rate or gradient clipping)")
        sizes = [len(t["boxes"]) for t in targets]
        per_image = [c.split(sizes, -1)[i % len(targets)] for i, c in enumerate(cost)]
        matched = [linear_sum_assignment(c) for c in per_image]
        indices = [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in matched]
        return [indices[k:k + len(targets)] for k in range(0, len(indices), len(targets))]
