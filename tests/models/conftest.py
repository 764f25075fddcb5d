"""Shared pieces for the model tests: a small config that runs in well under a second on
CPU, and synthetic images whose objects are bright rectangles."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ddetr_dist.config import ModelConfig

VARIANT_NAMES = ["base", "box_refine", "two_stage", "single_scale"]


def small_config(**changes) -> ModelConfig:
    cfg = ModelConfig(backbone_depth=18, hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=128,
                      num_queries=20, num_classes=5, enc_n_points=2, dec_n_points=2, dropout=0.0)
    return dataclasses.replace(cfg, **changes)


def rectangle_images(boxes_per_image: list[torch.Tensor], labels_per_image: list[torch.Tensor],
                     height: int = 64, width: int = 64):
    """Dark images with one bright rectangle per box, drawn in the channel of its label
    (mod 3) -> (images [B,3,H,W], padding mask [B,H,W], targets)."""
    images = torch.full((len(boxes_per_image), 3, height, width), -1.0)
    targets = []
    for i, (boxes, labels) in enumerate(zip(boxes_per_image, labels_per_image)):
        for (cx, cy, w, h), label in zip(boxes.tolist(), labels.tolist()):
            x0, x1 = int((cx - w / 2) * width), int((cx + w / 2) * width)
            y0, y1 = int((cy - h / 2) * height), int((cy + h / 2) * height)
            images[i, label % 3, y0:y1, x0:x1] = 2.0
        targets.append({"labels": labels, "boxes": boxes})
    return images, torch.zeros(len(boxes_per_image), height, width, dtype=torch.bool), targets


@pytest.fixture
def two_image_batch():
    boxes = [torch.tensor([[0.3, 0.3, 0.3, 0.4], [0.7, 0.7, 0.4, 0.3]]),
             torch.tensor([[0.5, 0.4, 0.6, 0.3], [0.25, 0.8, 0.3, 0.25]])]
    labels = [torch.tensor([0, 1]), torch.tensor([2, 1])]
    return rectangle_images(boxes, labels)


def weighted_loss(criterion, losses: dict) -> torch.Tensor:
    return sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
