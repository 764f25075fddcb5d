"""Box conversions, IoU and GIoU on cases worked out by hand."""
from __future__ import annotations

import pytest
import torch

from ddetr_dist.models.box_ops import (box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou,
                                       inverse_sigmoid)


def approx(values):
    return pytest.approx(values, abs=1e-6)


def test_conversions_round_trip():
    boxes = torch.rand(10, 4) * 0.5 + 0.1
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)
    assert box_cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])).tolist() == approx([0.4, 0.3, 0.6, 0.7])


def test_iou_and_giou():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0],   # overlap 1, union 7, hull 9
                      [0.0, 0.0, 2.0, 2.0],   # identical
                      [3.0, 0.0, 4.0, 1.0]])  # disjoint: area 1, union 5, hull 4x2=8
    iou, union = box_iou(a, b)
    assert iou[0].tolist() == approx([1 / 7, 1.0, 0.0])
    assert union[0].tolist() == approx([7.0, 4.0, 5.0])
    giou = generalized_box_iou(a, b)
    assert giou[0].tolist() == approx([1 / 7 - 2 / 9, 1.0, 0.0 - 3 / 8])


def test_inverse_sigmoid_is_finite_at_the_ends():
    x = torch.tensor([0.0, 0.25, 0.5, 1.0])
    y = inverse_sigmoid(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[1:3].sigmoid(), x[1:3])
