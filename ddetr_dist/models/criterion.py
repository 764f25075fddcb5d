"""The training losses: match predictions to targets (Hungarian), then sigmoid focal loss on
the classes and L1 + GIoU on the matched boxes, for the last decoder layer, every earlier
layer (`_0`, `_1`, ...) and the two-stage encoder proposals (`_enc`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddetr_dist import comm

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .matcher import HungarianMatcher

BOX_RANGE_TOLERANCE = 1e-4  # normalised boxes may overshoot 0..1 by rounding in the transforms


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, num_boxes: float,
                       alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) of logits [B,Q,C] against one-hot targets, averaged over
    queries and divided by the number of target boxes (the official normalisation)."""
    prob = inputs.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


def validate_targets(targets: list[dict], batch_size: int, num_classes: int) -> None:
    """Raise ValueError naming the offending field, so that bad annotations fail here and
    not as a NaN loss or a CUDA assert many steps later."""
    if not isinstance(targets, (list, tuple)) or len(targets) != batch_size:
        got = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
        raise ValueError(f"targets: expected a list of {batch_size} dicts (one per image), got {got}")
    for i, t in enumerate(targets):
        for key in ("labels", "boxes"):
            if not isinstance(t, dict) or key not in t or not torch.is_tensor(t[key]):
                raise ValueError(f"targets[{i}]['{key}']: missing or not a tensor")
        labels, boxes = t["labels"], t["boxes"]
        if labels.dim() != 1 or labels.dtype != torch.int64:
            raise ValueError(f"targets[{i}]['labels']: expected int64 [K], got {labels.dtype} "
                             f"{tuple(labels.shape)}; use .long()")
        if boxes.dim() != 2 or boxes.shape[1] != 4 or len(boxes) != len(labels) or not boxes.is_floating_point():
            raise ValueError(f"targets[{i}]['boxes']: expected float [{len(labels)},4] (one cxcywh box per label), "
                             f"got {boxes.dtype} {tuple(boxes.shape)}")
    # the values of the whole batch in one look (one host sync on a GPU); per image only to say which
    labels = torch.cat([t["labels"] for t in targets])
    boxes = torch.cat([t["boxes"] for t in targets])
    if len(labels) and bool((labels < 0).any() | (labels >= num_classes).any() | ~torch.isfinite(boxes).all()
                            | (boxes < -BOX_RANGE_TOLERANCE).any() | (boxes > 1 + BOX_RANGE_TOLERANCE).any()):
        for i, t in enumerate(targets):
            _check_values(i, t["labels"], t["boxes"], num_classes)


def _check_values(i: int, labels: torch.Tensor, boxes: torch.Tensor, num_classes: int) -> None:
    if len(labels) == 0:
        return
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"targets[{i}]['labels']: values must be in 0..{num_classes - 1} "
                         f"(model.num_classes={num_classes}), got {labels.min().item()}..{labels.max().item()}; "
                         "raise model.num_classes or remap the category ids")
    if not torch.isfinite(boxes).all():
        raise ValueError(f"targets[{i}]['boxes']: contains NaN or inf; drop or fix those annotations")
    if boxes.min() < -BOX_RANGE_TOLERANCE or boxes.max() > 1 + BOX_RANGE_TOLERANCE:
        raise ValueError(f"targets[{i}]['boxes']: expected normalised cxcywh in 0..1, got values in "
                         f"{boxes.min().item():.4g}..{boxes.max().item():.4g}; divide by the image (w, h, w, h)")


class SetCriterion(nn.Module):
    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 focal_alpha: float = 0.25):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict  # loss name -> weight; losses not listed are only logged
        self.focal_alpha = focal_alpha

    @staticmethod
    def _src_permutation_idx(indices, device: torch.device):
        """(image index, query index) of every matched prediction, on `device`."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx.to(device), src_idx.to(device)

    def loss_labels(self, outputs, targets, indices, num_boxes, log: bool = True) -> dict:
        src_logits = outputs["pred_logits"]
        idx = self._src_permutation_idx(indices, src_logits.device)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(src_logits.device)
        target_onehot = torch.zeros_like(src_logits)
        target_onehot[idx[0], idx[1], target_classes_o] = 1
        # x num_queries: undo the mean over queries inside the focal loss (official scaling)
        losses = {"loss_ce": sigmoid_focal_loss(src_logits, target_onehot, num_boxes, self.focal_alpha)
                  * src_logits.shape[1]}
        if log:
            matched = src_logits[idx]
            accuracy = ((matched.argmax(-1) == target_classes_o).float().mean() * 100
                        if len(matched) else matched.new_zeros(()))
            losses["class_error"] = (100 - accuracy).detach()
        return losses

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> dict:
        src_boxes = outputs["pred_boxes"][self._src_permutation_idx(indices, outputs["pred_boxes"].device)]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src_boxes)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        loss_giou = 1 - torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes)))
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes) -> dict:
        """Mean |detections - targets| per image, logged only. A detection is a query whose
        best class probability is above 0.5. (The official code counts queries whose argmax
        is not the last class, which under sigmoid classification counts nearly every query.)"""
        logits = outputs["pred_logits"]
        card_pred = (logits.sigmoid().amax(-1) > 0.5).sum(1).float()
        tgt_lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device, dtype=torch.float)
        return {"cardinality_error": F.l1_loss(card_pred, tgt_lengths)}

    def _losses_for(self, outputs, targets, num_boxes, suffix: str = "", indices=None) -> dict:
        indices = self.matcher(outputs, targets) if indices is None else indices
        losses = self.loss_labels(outputs, targets, indices, num_boxes, log=not suffix)
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        losses.update(self.loss_cardinality(outputs, targets, indices, num_boxes))
        return {k + suffix: v for k, v in losses.items()}

    def forward(self, outputs: dict, targets: list[dict], sync: bool = True,
                num_boxes: float | None = None) -> dict[str, torch.Tensor]:
        """outputs: the model's dict; targets: per image {'labels' int64 [K], 'boxes' [K,4]
        cxcywh in 0..1} -> {loss name: scalar}; weight with self.weight_dict. The losses are
        sums over boxes divided by `num_boxes`; by default the mean number of target boxes
        per rank (a collective), or this rank's own count with `sync=False` (evaluation,
        where ranks run different numbers of batches). The train loop passes the mean over
        an accumulation window's micro-batches, so that accumulated micro-batches give the
        gradient of one big batch."""
        validate_targets(targets, outputs["pred_logits"].shape[0], self.num_classes)
        if num_boxes is None:
            # boxes per rank differ; normalise every rank's loss by the global mean
            num_boxes = float(sum(len(t["labels"]) for t in targets))
            if sync:
                num_boxes = comm.all_reduce_sum([num_boxes])[0] / comm.get_world_size()
        num_boxes = max(num_boxes, 1.0)

        # the last decoder layer and the earlier ones share the targets: matched in one go
        aux = list(outputs.get("aux_outputs", []))
        last, *earlier = self.matcher.match_layers([outputs, *aux], targets)
        losses = self._losses_for(outputs, targets, num_boxes, indices=last)
        for i, (aux_outputs, indices) in enumerate(zip(aux, earlier)):
            losses.update(self._losses_for(aux_outputs, targets, num_boxes, f"_{i}", indices))
        if "enc_outputs" in outputs:
            # encoder proposals are trained class-agnostic: every target is class 0
            bin_targets = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
            losses.update(self._losses_for(outputs["enc_outputs"], bin_targets, num_boxes, "_enc"))
        return losses


def build_weight_dict(cls_coef: float, bbox_coef: float, giou_coef: float, dec_layers: int,
                      aux_loss: bool, two_stage: bool) -> dict[str, float]:
    base = {"loss_ce": cls_coef, "loss_bbox": bbox_coef, "loss_giou": giou_coef}
    weight_dict = dict(base)
    if aux_loss:
        for i in range(dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    if two_stage:
        weight_dict.update({f"{k}_enc": v for k, v in base.items()})
    return weight_dict
