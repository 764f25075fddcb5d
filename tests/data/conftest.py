"""Fixtures for the data tests: a small demo data set (generated once per session) and a
tiny hand-made COCO data set."""
from __future__ import annotations

import json

import pytest

from data_helpers import jpeg_bytes
from ddetr_dist.data import demo


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    """{'dir', 'train', 'val' (shard patterns), 'train_count', 'val_count'}: 5 train shards
    of 5 images and 3 val shards (5, 5, 1 images)."""
    out = tmp_path_factory.mktemp("demo")
    patterns = demo.generate(out, train=25, val=11, seed=3, images_per_shard=5, workers=1, progress=False)
    return {"dir": out, **patterns, "train_count": 25, "val_count": 11}


@pytest.fixture
def tiny_coco(tmp_path) -> dict:
    """A hand-made COCO set: 4 images (one without annotations, one with a crowd region and
    a degenerate box), sparse category ids 3 and 7. Returns paths and the instances dict."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    sizes = [(40, 30), (50, 40), (30, 30), (60, 20)]
    images = []
    for i, (w, h) in enumerate(sizes, start=1):
        name = f"img{i}.jpg"
        (images_dir / name).write_bytes(jpeg_bytes(w, h))
        images.append({"id": i * 10, "file_name": name, "width": w, "height": h})
    annotations = [
        {"id": 1, "image_id": 10, "bbox": [2, 3, 10, 8], "category_id": 3, "area": 80, "iscrowd": 0},
        {"id": 2, "image_id": 10, "bbox": [30, 20, 20, 20], "category_id": 7, "area": 400, "iscrowd": 0},
        {"id": 3, "image_id": 20, "bbox": [5, 5, 20, 20], "category_id": 7, "area": 300, "iscrowd": 1},
        {"id": 4, "image_id": 20, "bbox": [1, 1, 0, 5], "category_id": 3, "area": 0, "iscrowd": 0},
        {"id": 5, "image_id": 20, "bbox": [10, 10, 5, 5], "category_id": 3, "area": 25, "iscrowd": 0},
        {"id": 6, "image_id": 40, "bbox": [0, 0, 60, 20], "category_id": 7, "area": 1200, "iscrowd": 0},
    ]  # image 30 has none
    instances = {"images": images, "annotations": annotations,
                 "categories": [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]}
    ann_path = tmp_path / "instances.json"
    ann_path.write_text(json.dumps(instances))
    return {"images": images_dir, "annotations": ann_path, "instances": instances, "out": tmp_path / "shards"}
