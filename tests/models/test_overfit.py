"""End to end: a small model learns two synthetic images (bright rectangles) by heart."""
from __future__ import annotations

import torch

from ddetr_dist.models import build_model
from ddetr_dist.models.box_ops import box_cxcywh_to_xyxy, box_iou

from .conftest import small_config, weighted_loss

STEPS = 120


def test_overfits_two_images(two_image_batch):
    images, mask, targets = two_image_batch
    torch.manual_seed(0)
    cfg = small_config(enc_layers=1, num_queries=10, num_classes=3, num_feature_levels=2)
    model, criterion, postprocess = build_model(cfg)
    # Backbone fixed (as the official recipe with lr_backbone=0): updating its 11M weights
    # would take 3/4 of each step on CPU. Gradients into it are checked in test_criterion.
    model.backbone.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0)
    losses = []
    for _ in range(STEPS):
        loss = weighted_loss(criterion, criterion(model(images, mask), targets))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # the official recipe's clip
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-10:]) < losses[0] / 30, (losses[0], losses[-10:])

    model.eval()
    with torch.no_grad():
        results = postprocess(model(images, mask), torch.tensor([[64, 64], [64, 64]]))
    for result, target in zip(results, targets):
        k = len(target["labels"])
        # the k best detections are the k objects: right classes, boxes overlapping well
        assert sorted(result["labels"][:k].tolist()) == sorted(target["labels"].tolist())
        assert (result["scores"][:k] > 0.5).all()
        iou, _ = box_iou(result["boxes"][:k] / 64, box_cxcywh_to_xyxy(target["boxes"]))
        assert (iou.max(0).values > 0.8).all(), iou
