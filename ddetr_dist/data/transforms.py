"""Image + target transforms of the official recipe, without torchvision.

Every transform is called as `t(image: PIL.Image, target: dict, rng: random.Random)` and
returns (image, target). Randomness comes only from `rng`, which the loader seeds from
(seed, epoch, slot), so an epoch's augmentations are reproducible. Until `Normalize`,
target boxes are xyxy in pixels (as `coco.record_to_target` makes them); `Normalize` turns
the image into a normalised float tensor and the boxes into cxcywh relative to the image.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ddetr_dist.config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Compose:
    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image, target, rng):
        for t in self.transforms:
            image, target = t(image, target, rng)
        return image, target


class RandomSelect:
    """`first` with probability p, else `second`."""

    def __init__(self, first, second, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target, rng):
        return (self.first if rng.random() < self.p else self.second)(image, target, rng)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target, rng):
        if rng.random() >= self.p:
            return image, target
        width = image.width
        target = dict(target)
        boxes = target["boxes"]
        target["boxes"] = boxes[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([width, 0, width, 0])
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), target


def resized_size(width: int, height: int, shorter: int, max_size: int | None) -> tuple[int, int]:
    """(w, h) with the shorter side `shorter`, lowered so the longer side stays <= max_size
    (the official get_size_with_aspect_ratio, same rounding)."""
    if max_size is not None:
        lo, hi = float(min(width, height)), float(max(width, height))
        if hi / lo * shorter > max_size:
            shorter = int(round(max_size * lo / hi))
    if (width <= height and width == shorter) or (height <= width and height == shorter):
        return width, height
    if width < height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def resize(image: Image.Image, target: dict, shorter: int, max_size: int | None):
    width, height = resized_size(image.width, image.height, shorter, max_size)
    if (width, height) == image.size:
        return image, target
    ratio_w, ratio_h = width / image.width, height / image.height
    target = dict(target)
    target["boxes"] = target["boxes"] * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    target["area"] = target["area"] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    return image.resize((width, height), Image.Resampling.BILINEAR), target


class RandomResize:
    """Shorter side to one of `sizes` (chosen at random), longer side capped at max_size."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, image, target, rng):
        return resize(image, target, rng.choice(self.sizes), self.max_size)


class RandomSizeCrop:
    """A crop of random size in [min_size, max_size] per side (capped by the image) at a
    random place. Boxes are clipped to the crop; those left empty are removed (as official).
    Unlike the official one (which raises) an image smaller than min_size is not cropped
    along that side."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target, rng):
        width = rng.randint(min(self.min_size, image.width), min(image.width, self.max_size))
        height = rng.randint(min(self.min_size, image.height), min(image.height, self.max_size))
        top = rng.randint(0, image.height - height)
        left = rng.randint(0, image.width - width)
        return crop(image, target, top, left, height, width)


def crop(image: Image.Image, target: dict, top: int, left: int, height: int, width: int):
    target = dict(target)
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes = torch.min(boxes.reshape(-1, 2, 2), torch.tensor([width, height], dtype=torch.float32)).clamp(min=0)
    keep = torch.all(boxes[:, 1, :] > boxes[:, 0, :], dim=1)
    # like the official crop, area becomes the clipped box's area
    target["area"] = (boxes[:, 1, :] - boxes[:, 0, :]).prod(dim=1)[keep]
    target["boxes"] = boxes.reshape(-1, 4)[keep]
    target["labels"] = target["labels"][keep]
    target["iscrowd"] = target["iscrowd"][keep]
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    return image.crop((left, top, left + width, top + height)), target


class Normalize:
    """PIL image -> float tensor [3,H,W] normalised with ImageNet mean/std; boxes xyxy in
    pixels -> cxcywh in 0..1 of this (unpadded) image."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        # folded into one multiply-add: (x/255 - mean)/std = x * scale + shift
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t

    def __call__(self, image, target, rng):
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        tensor = pixels.float().mul_(self.scale).add_(self.shift)  # in place: the fastest here
        height, width = tensor.shape[-2:]
        target = dict(target)
        x0, y0, x1, y1 = target["boxes"].unbind(-1)
        cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
        target["boxes"] = cxcywh / torch.tensor([width, height, width, height], dtype=torch.float32)
        return tensor, target


def build_train_transform(cfg: DataConfig) -> Compose:
    """The official training recipe: flip, then either a multi-scale resize or a resize,
    random crop and multi-scale resize, then normalise."""
    return Compose([
        RandomHorizontalFlip(),
        RandomSelect(
            RandomResize(cfg.train_scales, max_size=cfg.max_size),
            Compose([RandomResize(cfg.crop_scales),
                     RandomSizeCrop(cfg.crop_min_size, cfg.crop_max_size),
                     RandomResize(cfg.train_scales, max_size=cfg.max_size)])),
        Normalize(),
    ])


def build_val_transform(cfg: DataConfig) -> Compose:
    """Resize only: shorter side val_scale, longer side at most max_size."""
    return Compose([RandomResize([cfg.val_scale], max_size=cfg.max_size), Normalize()])
