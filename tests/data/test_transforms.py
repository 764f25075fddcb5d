"""Transforms: boxes stay on the pixels they describe through flip, resize, crop and the
whole official recipe; sizes follow the multi-scale rules; randomness comes from the rng."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from data_helpers import small_cfg
from ddetr_dist.data import transforms as T


def _scene(width: int, height: int, boxes: list[tuple[int, int, int, int]]):
    """A black image with white rectangles exactly at `boxes` (xyxy, exclusive end) and its target."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(255, 255, 255))
    k = len(boxes)
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.arange(k, dtype=torch.int64) + 1,
              "area": torch.tensor([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes], dtype=torch.float32),
              "iscrowd": torch.zeros(k, dtype=torch.int64), "image_id": torch.tensor([1]),
              "orig_size": torch.tensor([height, width]), "size": torch.tensor([height, width])}
    return image, target


def _bright_box(mask: torch.Tensor) -> list[float] | None:
    """xyxy (exclusive end) of the True pixels of a [H,W] mask, or None."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs) == 0:
        return None
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def _pil_bright_box(image: Image.Image):
    return _bright_box(torch.from_numpy(np.array(image.convert("L"))) > 127)


@pytest.mark.parametrize("seed", range(12))
def test_boxes_follow_pixels_through_flip_resize_crop(seed):
    rng = random.Random(seed)
    image, target = _scene(90, 70, [(10, 15, 40, 50)])
    steps = [T.RandomHorizontalFlip(1.0), T.RandomResize([50, 110], max_size=150), T.RandomSizeCrop(30, 60)]
    for step in steps:
        image, target = step(image, target, rng)
        assert target["size"].tolist() == [image.height, image.width]
        seen = _pil_bright_box(image)
        if seen is None:  # cropped away: the box must be gone too
            assert len(target["boxes"]) == 0
            continue
        assert len(target["boxes"]) == 1
        assert target["boxes"][0].tolist() == pytest.approx(seen, abs=2.0)


@pytest.mark.parametrize("seed", range(20))
def test_train_recipe_keeps_boxes_on_their_pixels(seed):
    cfg = small_cfg()
    rng = random.Random(seed)
    image, target = _scene(120, 90, [(10, 10, 50, 40), (70, 50, 110, 85)])
    tensor, out = T.build_train_transform(cfg)(image, target, rng)
    h, w = tensor.shape[1:]
    assert out["size"].tolist() == [h, w] and max(h, w) <= cfg.max_size
    assert out["boxes"].dtype == torch.float32 and ((out["boxes"] >= 0) & (out["boxes"] <= 1)).all()
    bright = tensor.min(dim=0).values > 1.0  # white normalises to > 2, black to < -1.5
    for (cx, cy, bw, bh), label in zip(out["boxes"].tolist(), out["labels"].tolist()):
        # each remaining box's region is (almost entirely) its white rectangle
        x0, y0, x1, y1 = (round((cx - bw / 2) * w), round((cy - bh / 2) * h),
                          round((cx + bw / 2) * w), round((cy + bh / 2) * h))
        if min(x1 - x0, y1 - y0) >= 4:  # a sliver left by a crop is too thin to judge
            inner = bright[y0 + 1:y1 - 1, x0 + 1:x1 - 1]
            assert inner.float().mean() > 0.95, (label, (x0, y0, x1, y1))
    # and every white pixel lies in some box
    covered = torch.zeros_like(bright)
    for cx, cy, bw, bh in out["boxes"].tolist():
        covered[max(0, int((cy - bh / 2) * h) - 1):int((cy + bh / 2) * h) + 2,
                max(0, int((cx - bw / 2) * w) - 1):int((cx + bw / 2) * w) + 2] = True
    assert not (bright & ~covered).any()


def test_resized_size_rules():
    for width, height in [(640, 480), (480, 640), (300, 1200), (1000, 1000), (37, 91)]:
        for shorter in (400, 800):
            w, h = T.resized_size(width, height, shorter, max_size=1333)
            assert max(w, h) <= 1333
            if max(width, height) / min(width, height) * shorter <= 1333:
                assert min(w, h) == shorter
            else:
                assert min(w, h) < shorter
            assert abs(w / h - width / height) < 2 / min(w, h)
            assert T.resized_size(width, height, shorter, None)[width > height] == shorter


def test_normalize_mean_pixel_is_zero_and_boxes_become_relative_cxcywh():
    mean_pixel = tuple(round(255 * m) for m in T.IMAGENET_MEAN)
    image = Image.new("RGB", (100, 80), mean_pixel)
    target = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]])}
    tensor, out = T.Normalize()(image, target, random.Random(0))
    assert tensor.shape == (3, 80, 100) and tensor.dtype == torch.float32
    assert tensor.abs().max() < 1 / (255 * min(T.IMAGENET_STD))
    x0, y0, x1, y1 = target["boxes"][0].tolist()
    expected = [(x0 + x1) / 2 / 100, (y0 + y1) / 2 / 80, (x1 - x0) / 100, (y1 - y0) / 80]
    assert out["boxes"][0].tolist() == pytest.approx(expected)


def test_crop_clips_boxes_and_removes_those_left_empty():
    image, target = _scene(100, 100, [(10, 10, 30, 30), (50, 50, 90, 90), (0, 0, 5, 5)])
    target["iscrowd"] = torch.tensor([0, 1, 0])
    out_image, out = T.crop(image, target, top=20, left=20, height=50, width=50)
    assert out_image.size == (50, 50) and out["size"].tolist() == [50, 50]
    # box 1 clipped at the crop's top-left, box 2 at its bottom-right, box 3 gone
    assert out["boxes"].tolist() == [[0.0, 0.0, 10.0, 10.0], [30.0, 30.0, 50.0, 50.0]]
    assert out["labels"].tolist() == [1, 2] and out["iscrowd"].tolist() == [0, 1]
    assert out["area"].tolist() == [100.0, 400.0]


def test_size_crop_of_an_image_smaller_than_min_size_does_not_fail():
    image, target = _scene(20, 300, [(2, 2, 10, 10)])
    out_image, _ = T.RandomSizeCrop(384, 600)(image, target, random.Random(0))
    assert out_image.width == 20 and 20 <= out_image.height <= 300


def test_val_transform_resizes_only():
    cfg = small_cfg()
    image, target = _scene(120, 90, [(10, 10, 50, 40)])
    outs = [T.build_val_transform(cfg)(image, target, random.Random(s)) for s in range(3)]
    assert all(torch.equal(outs[0][0], o[0]) for o in outs)
    assert min(outs[0][0].shape[1:]) == cfg.val_scale
    assert outs[0][1]["labels"].tolist() == target["labels"].tolist()


def test_randomness_comes_from_the_rng_only():
    cfg = small_cfg()
    image, target = _scene(120, 90, [(10, 10, 50, 40)])
    transform = T.build_train_transform(cfg)
    runs = [transform(image, target, random.Random(s)) for s in (5, 5, 6, 7, 8)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1]["boxes"], runs[1][1]["boxes"])
    assert any(r[0].shape != runs[0][0].shape or not torch.equal(r[0], runs[0][0]) for r in runs[2:])
