"""Fixtures of the engine tests."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ddetr_dist.data.shard import write_shards

SQUARE_SIDE = 96


@pytest.fixture(scope="session")
def one_process():
    """This pytest process as a world of one (gloo), for the tests that build a DeepSpeed
    engine in it: one group for the whole session, since DeepSpeed keeps the groups it saw
    first and a second group would be unknown to it."""
    from ddetr_dist.on_ray.bench import one_process_group

    with one_process_group():
        yield


@pytest.fixture(scope="session")
def square_data(tmp_path_factory):
    """16 train images of exactly 96x96 (noise with 1-3 boxes of 3 categories) in shards of
    4. With data.train_scales=[96], max_size 96 and crops of 96, every batch is 96x96 without
    padding: batches of different sizes then hold the same pixels (the full model is not
    exactly padding-invariant)."""
    out = tmp_path_factory.mktemp("square")
    rng = np.random.default_rng(0)
    (out / "images").mkdir()
    images, annotations = [], []
    for image_id in range(1, 17):
        name = f"{image_id:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (SQUARE_SIDE, SQUARE_SIDE, 3), dtype=np.uint8)).save(out / "images" / name)
        images.append({"id": image_id, "file_name": name, "width": SQUARE_SIDE, "height": SQUARE_SIDE})
        for _ in range(int(rng.integers(1, 4))):
            x, y = rng.uniform(0, 60, 2)
            w, h = rng.uniform(10, 35, 2)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(rng.integers(1, 4)),
                                "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h), "iscrowd": 0})
    instances = {"images": images, "annotations": annotations,
                 "categories": [{"id": i, "name": f"class{i}"} for i in (1, 2, 3)]}
    (out / "instances.json").write_text(json.dumps(instances))
    write_shards(out / "images", out / "instances.json", out / "shards", max_count=4, workers=1, progress=False)
    return out / "shards"


SQUARE_OVERRIDES = [f"data.train_scales=[{SQUARE_SIDE}]", f"data.max_size={SQUARE_SIDE}",
                    f"data.crop_scales=[{SQUARE_SIDE}]", f"data.crop_min_size={SQUARE_SIDE}",
                    f"data.crop_max_size={SQUARE_SIDE}"]
