"""PostProcess: top-k over queries x classes, boxes in the original image's pixels."""
from __future__ import annotations

import pytest
import torch

from ddetr_dist.models.postprocess import PostProcess


def test_top_detections_in_absolute_xyxy():
    logits = torch.full((2, 3, 4), -10.0)
    logits[0, 2, 1] = 3.0   # best: query 2, class 1
    logits[0, 0, 3] = 1.0   # second: query 0, class 3
    logits[1, 1, 0] = 2.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]]] * 2)
    results = PostProcess(num_detections=5)({"pred_logits": logits, "pred_boxes": boxes},
                                            torch.tensor([[100, 200], [50, 50]]))  # (h, w)
    first = results[0]
    assert first["labels"][:2].tolist() == [1, 3]
    assert first["scores"][:2].tolist() == pytest.approx(torch.tensor([3.0, 1.0]).sigmoid().tolist())
    assert first["boxes"][0].tolist() == pytest.approx([0.0, 50.0, 100.0, 100.0])  # x by w=200, y by h=100
    assert first["boxes"][1].tolist() == pytest.approx([80.0, 30.0, 120.0, 70.0])
    assert results[1]["labels"][0] == 0 and results[1]["boxes"][0].tolist() == pytest.approx([2.5, 2.5, 7.5, 7.5])
    assert all(len(r["scores"]) == 5 for r in results)
    assert (first["scores"][:-1] >= first["scores"][1:]).all()


def test_default_is_top_100_capped_by_queries_times_classes():
    outputs = {"pred_logits": torch.randn(1, 300, 91), "pred_boxes": torch.rand(1, 300, 4)}
    assert len(PostProcess()(outputs, torch.tensor([[480, 640]]))[0]["scores"]) == 100
    outputs = {"pred_logits": torch.randn(1, 10, 5), "pred_boxes": torch.rand(1, 10, 4)}
    assert len(PostProcess()(outputs, torch.tensor([[480, 640]]))[0]["scores"]) == 50


def test_target_sizes_shape_is_checked():
    outputs = {"pred_logits": torch.randn(2, 10, 5), "pred_boxes": torch.rand(2, 10, 4)}
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess()(outputs, torch.tensor([[480, 640]]))
