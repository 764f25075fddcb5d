"""generate the built-in demo detection dataset (COCO json + jpgs + shards)

Six categories of shapes, each with its own shape and colour (jittered): circle, square,
triangle, star, cross, diamond. Each image has a gradient background with noise, a size
between 192 and 320 px per side (small: a CPU trains at about this resolution, so no object
is shrunk below what the detector can see), and 0 to 8 objects from 12 px to 60% of the
shorter side, some overlapping (larger ones are drawn first so small ones stay visible). Every
image comes from its own seed (seed, split, index), so the data set depends only on the
seed, not on the number of processes.

  OUT/train/{images/, annotations.json, shards/train-*.tar, shards/manifest.json}
  OUT/val/...   (same layout)
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ddetr_dist.data.shard import shard_pattern, write_shards

CATEGORIES = [  # (id, name, colour); ids used as labels: model.num_classes=auto gives 7
    (1, "circle", (220, 50, 50)),
    (2, "square", (50, 180, 60)),
    (3, "triangle", (60, 90, 230)),
    (4, "star", (235, 200, 40)),
    (5, "cross", (200, 60, 200)),
    (6, "diamond", (40, 200, 210)),
]
SPLITS = {"train": 0, "val": 1}  # split -> its seed stream
MIN_SIDE, MAX_SIDE = 192, 320
MIN_OBJECT = 12
MAX_OBJECTS = 8


def _regular(n: int, radii: tuple[float, ...], start: float = -math.pi / 2) -> list[tuple[float, float]]:
    """n * len(radii) vertices at alternating radii (a polygon or a star) in the unit box."""
    k = n * len(radii)
    return [(radii[i % len(radii)] * math.cos(start + 2 * math.pi * i / k),
             radii[i % len(radii)] * math.sin(start + 2 * math.pi * i / k)) for i in range(k)]


_ARM = 0.33
# unit outlines (within [-1, 1]^2) and the largest rotation each may get, in degrees
OUTLINES = {
    "square": ([(-1, -1), (1, -1), (1, 1), (-1, 1)], 0),
    "triangle": (_regular(3, (1.0,)), 180),
    "star": (_regular(5, (1.0, 0.42)), 180),
    "cross": ([(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1),
               (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)], 15),
    "diamond": ([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)], 20),
}


def _polygon_area(points: list[tuple[float, float]]) -> float:
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1])))


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A linear gradient between two random colours at a random angle (float HxWx3)."""
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xs * math.cos(angle) / width + ys * math.sin(angle) / height
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    start, end = rng.uniform(20, 235, size=(2, 3)).astype(np.float32)
    return start + t[..., None] * (end - start)


def _overlap(a: list[float], b: list[float]) -> float:
    """IoU of two xywh boxes."""
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def make_image(seed: int, split: str, image_id: int) -> tuple[Image.Image, list[dict]]:
    """One image and its objects [{category_id, bbox xywh, area}], from its own seed."""
    rng = np.random.default_rng([seed, SPLITS[split], image_id])
    width, height = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    image = Image.fromarray(_background(rng, width, height).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    n = 0 if rng.random() < 0.03 else int(rng.integers(1, MAX_OBJECTS + 1))
    # log-uniform sizes from MIN_OBJECT to 60% of the shorter side, largest drawn first
    largest = 0.6 * min(width, height)
    sizes = sorted(np.exp(rng.uniform(math.log(MIN_OBJECT), math.log(largest), size=n)), reverse=True)
    objects: list[dict] = []
    for size in sizes:
        category_id, name, colour = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        if name == "circle":
            offsets, area = None, math.pi * size * size / 4
            left = top = -size / 2
            right = bottom = size / 2
        else:  # the outline scaled and turned about the centre
            outline, max_turn = OUTLINES[name]
            turn = math.radians(rng.uniform(-max_turn, max_turn))
            c, s = math.cos(turn), math.sin(turn)
            offsets = [(size / 2 * (x * c - y * s), size / 2 * (x * s + y * c)) for x, y in outline]
            area = _polygon_area(offsets)
            left, right = min(p[0] for p in offsets), max(p[0] for p in offsets)
            top, bottom = min(p[1] for p in offsets), max(p[1] for p in offsets)
        for _ in range(10):  # a few tries to avoid hiding an earlier object
            cx, cy = rng.uniform(-left, width - right), rng.uniform(-top, height - bottom)
            bbox = [cx + left, cy + top, right - left, bottom - top]
            if all(_overlap(bbox, o["bbox"]) < 0.3 for o in objects):
                break
        else:
            continue
        fill = tuple(int(v) for v in np.clip(np.array(colour) + rng.integers(-30, 31, size=3), 0, 255))
        if offsets is None:
            draw.ellipse([bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]], fill=fill)
        else:
            draw.polygon([(cx + x, cy + y) for x, y in offsets], fill=fill)
        objects.append({"category_id": category_id, "bbox": [round(v, 2) for v in bbox], "area": round(area, 2)})
    amplitude = int(rng.integers(4, 21))
    noise = rng.integers(-amplitude, amplitude + 1, size=(height, width, 3), dtype=np.int16)
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), objects


def _write_image(job: tuple[int, str, int, Path]) -> tuple[dict, list[dict]]:
    seed, split, image_id, images_dir = job
    image, objects = make_image(seed, split, image_id)
    file_name = f"{image_id:012d}.jpg"
    image.save(images_dir / file_name, quality=90)
    return {"id": image_id, "file_name": file_name, "width": image.width, "height": image.height}, objects


def write_split(out_dir: Path, split: str, count: int, seed: int, pool) -> Path:
    """Images and annotations.json of one split; returns the annotation file's path."""
    images_dir = out_dir / split / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, split, image_id, images_dir) for image_id in range(1, count + 1)]
    results = pool.imap(_write_image, jobs, chunksize=16) if pool else map(_write_image, jobs)
    images, annotations = [], []
    for image, objects in results:
        images.append(image)
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "iscrowd": 0, **obj})
    coco = {"info": {"description": f"ddetr_dist demo shapes, {split}, seed {seed}"}, "licenses": [],
            "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": name, "supercategory": "shape"} for i, name, _ in CATEGORIES]}
    path = out_dir / split / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def generate(out_dir: str | Path, train: int = 2000, val: int = 200, seed: int = 0,
             images_per_shard: int = 100, workers: int = 2, progress: bool = True) -> dict[str, str]:
    """Write both splits and shard them; returns {split: shard brace pattern}."""
    out_dir = Path(out_dir)
    patterns = {}
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        for split, count in (("train", train), ("val", val)):
            if count <= 0:
                continue
            annotations = write_split(out_dir, split, count, seed, pool)
            shards_dir = out_dir / split / "shards"
            manifest = write_shards(out_dir / split / "images", annotations, shards_dir, prefix=split,
                                    max_count=images_per_shard, workers=workers, progress=progress)
            patterns[split] = shard_pattern(shards_dir, split, len(manifest["shards"]))
    finally:
        if pool is not None:
            pool.terminate()
    return patterns


def ensure_demo_data(train_shards: str) -> None:
    """The demo config points at data/demo/{train,val}/shards: make them when missing."""
    shards = Path(train_shards)
    if (shards / "manifest.json").exists():
        return
    out = shards.parent.parent
    print(f"demo data: generating into {out} (once)")
    generate(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--val", type=int, default=200, help="validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images-per-shard", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="processes drawing and verifying images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    patterns = generate(args.out, train=args.train, val=args.val, seed=args.seed,
                        images_per_shard=args.images_per_shard, workers=args.workers,
                        progress=not args.no_progress)
    print(f"demo data in {args.out} ({time.perf_counter() - start:.1f} s). Train on it with:")
    # a shard directory stands for every shard its manifest lists
    overrides = [f"data.{split}_shards={Path(args.out) / split / 'shards'}" for split in patterns]
    print("  " + " ".join(overrides))  # model.num_classes=auto (the default) reads the manifest
    return 0
