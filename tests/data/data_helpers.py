"""Helpers for the data tests (conftest.py holds the fixtures)."""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

from PIL import Image

from ddetr_dist.config import DataConfig


def small_cfg(**overrides) -> DataConfig:
    """The official recipe's structure at small sizes (fast on CPU)."""
    base = DataConfig(batch_size=2, num_workers=0, shuffle_buffer=8, train_scales=(64, 80, 96), val_scale=64,
                      max_size=128, crop_scales=(60, 70), crop_min_size=40, crop_max_size=56)
    return dataclasses.replace(base, **overrides)


def image_ids(batches) -> list[int]:
    return [int(t["image_id"]) for batch in batches for t in batch[2]]


def jpeg_bytes(width: int, height: int, colour=(120, 60, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_instances(info: dict, instances: dict) -> None:
    Path(info["annotations"]).write_text(json.dumps(instances))
