"""The same few val images at every evaluation, drawn with their ground truth and the
detections above a score threshold: a user watches the detector learn in TensorBoard (and
in `eval/<step>/predictions.png`)."""
from __future__ import annotations

import json
import random

import torch
from PIL import Image

from ddetr_dist.config import Config, pad_multiple
from ddetr_dist.data import SkipCounter, build_val_transform, collate, load_shard_set
from ddetr_dist.data.coco import record_to_target
from ddetr_dist.data.decode import IMAGE_EXTENSIONS, open_image
from ddetr_dist.data.partition import Piece
from ddetr_dist.data.streaming import read_piece
from ddetr_dist.engine.draw import draw_boxes, grid


def first_val_samples(cfg: Config, count: int) -> tuple[list[tuple[Image.Image, dict]], dict[int, str]]:
    """The first `count` readable samples of the val shards, as (image, record); and the
    category names by id."""
    shards = load_shard_set(cfg.data.val_shards, cfg.data.allow_pipe_urls, cfg.data.val_manifest)
    samples, skips = [], SkipCounter()
    for index, (url, n) in enumerate(zip(shards.urls, shards.counts)):
        for sample in read_piece(url, Piece(index, 0, n), skips):
            data = next((sample[ext] for ext in IMAGE_EXTENSIONS.values() if ext in sample), None)
            if data is None or "json" not in sample:
                continue
            try:
                samples.append((open_image(data).convert("RGB"), json.loads(sample["json"])))
            except Exception:  # a broken sample is counted by the loaders; here just take the next
                continue
            if len(samples) == count:
                return samples, {c["id"]: c["name"] for c in shards.categories}
    return samples, {c["id"]: c["name"] for c in shards.categories}


class PredictionPictures:
    def __init__(self, cfg: Config, count: int = 4, threshold: float = 0.3):
        self.cfg, self.threshold = cfg, threshold
        self.samples, self.names = first_val_samples(cfg, count)
        self.transform = build_val_transform(cfg.data)
        category_ids = frozenset(self.names)
        self.targets = [record_to_target(record, category_ids, keep_crowd=True)[0] for _, record in self.samples]

    @torch.no_grad()
    def render(self, model, postprocess, device: torch.device) -> Image.Image | None:
        if not self.samples:
            return None
        batch = [self.transform(image, dict(target), random.Random(0))
                 for (image, _), target in zip(self.samples, self.targets)]
        images, padding_mask, targets = collate(batch, pad_multiple(self.cfg))
        model.eval()
        outputs = model(images.to(device), padding_mask.to(device))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        pictures = []
        for (image, _), target, result in zip(self.samples, self.targets, postprocess(outputs, sizes)):
            keep = result["scores"] >= self.threshold
            detections = [{"bbox": b, "label": int(l), "score": float(s)} for b, l, s in
                          zip(result["boxes"][keep].float().cpu().tolist(), result["labels"][keep].tolist(),
                              result["scores"][keep].tolist())]
            truth = [{"bbox": b} for b in target["boxes"].tolist()]
            pictures.append(draw_boxes(image, detections, self.names, truth))
        return grid(pictures)
