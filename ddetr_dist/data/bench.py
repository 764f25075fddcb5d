"""the loader: shards through decode + train transforms vs. loose files + COCO JSON

Measured in one run, so the numbers compare (this machine is shared and noisy):
  shards, 1 worker   one loader worker's images/s: read the tar, decode, train transforms, collate
  files, 1 worker    the same images as individual files + the COCO JSON, same decode and transforms
  loader, N workers  the whole train loader (DataLoader with N worker processes), one epoch
Without --shards, demo data is generated into a temporary directory first.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from ddetr_dist.config import DataConfig
from ddetr_dist.data import demo
from ddetr_dist.data.coco import image_records, load_instances
from ddetr_dist.data.collate import collate
from ddetr_dist.data.decode import SampleDecoder
from ddetr_dist.data.manifest import load_shard_set
from ddetr_dist.data.skips import SkipCounter
from ddetr_dist.data.streaming import ShardStream, build_train_loader
from ddetr_dist.data.transforms import build_train_transform


def _timed_images(batches) -> tuple[int, float]:
    """(images, seconds) to consume an iterable of (images, mask, targets, ...) batches."""
    start, images = time.perf_counter(), 0
    for batch in batches:
        images += len(batch[2])
    return images, time.perf_counter() - start


def shards_one_worker(cfg: DataConfig, count: int) -> tuple[int, float]:
    shards = load_shard_set(cfg.train_shards, cfg.allow_pipe_urls, cfg.train_manifest)
    stream = ShardStream(shards, build_train_transform(cfg), train=True, batch_size=cfg.batch_size, rank=0,
                         world_size=1, num_workers=0, batches_per_rank=max(1, count // cfg.batch_size),
                         shuffle_buffer=cfg.shuffle_buffer)
    return _timed_images(iter(stream))


def files_one_worker(cfg: DataConfig, images_dir: Path, annotations: Path, count: int) -> tuple[int, float]:
    start = time.perf_counter()
    records, categories, _ = image_records(load_instances(annotations), str(annotations))
    decoder = SampleDecoder(build_train_transform(cfg), frozenset(c["id"] for c in categories),
                            keep_crowd=False, skips=SkipCounter())
    rng = random.Random(0)

    def batches():
        batch = []
        for record in records[:count]:
            path = images_dir / record["file_name"]
            item = decoder.decode(path.read_bytes(), record, rng, str(path))
            if item is not None:
                batch.append(item)
            if len(batch) == cfg.batch_size:
                yield collate(batch)
                batch = []

    images, _ = _timed_images(batches())
    return images, time.perf_counter() - start  # reading the JSON included


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", default="", help="train shards (path/pattern); default: generate demo data")
    parser.add_argument("--images", default="", help="loose images to compare with (default: the demo's)")
    parser.add_argument("--annotations", default="", help="their COCO JSON (default: the demo's)")
    parser.add_argument("--count", type=int, default=200, help="images per measurement")
    parser.add_argument("--workers", type=int, default=2, help="loader workers for the whole-loader line")
    parser.add_argument("--batch-size", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="ddetr-bench-data-") as tmp:
        shards, images_dir, annotations = args.shards, args.images, args.annotations
        if not shards:
            start = time.perf_counter()
            shards = demo.generate(tmp, train=args.count, val=0, progress=False)["train"]
            images_dir, annotations = Path(tmp) / "train" / "images", Path(tmp) / "train" / "annotations.json"
            print(f"generated {args.count} demo images in {time.perf_counter() - start:.1f} s")
        cfg = DataConfig(train_shards=shards, batch_size=args.batch_size, num_workers=args.workers,
                         samples_per_epoch=args.count)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a loader worker (the DataLoader sets one thread there)
        try:
            rows = [("shards, 1 worker", *shards_one_worker(cfg, args.count))]
            if images_dir and annotations:
                rows.append(("files + COCO JSON, 1 worker",
                             *files_one_worker(cfg, Path(images_dir), Path(annotations), args.count)))
        finally:
            torch.set_num_threads(threads)
        loader = build_train_loader(cfg, seed=0, rank=0, world_size=1)
        rows.append((f"loader, {args.workers} workers", *_timed_images(loader)))

    print(f"{'path':<30}{'images':>8}{'seconds':>9}{'images/s':>10}")
    for name, images, seconds in rows:
        print(f"{name:<30}{images:>8}{seconds:>9.2f}{images / seconds:>10.1f}")
    if len(rows) == 3:
        print(f"shards / files: {rows[0][1] / rows[0][2] / (rows[1][1] / rows[1][2]):.2f}x")
    print("(train transforms: flip, multi-scale resize up to 800x1333 or resize-crop-resize, normalise)")
    return 0
