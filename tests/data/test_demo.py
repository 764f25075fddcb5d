"""The demo data set: reproducible from its seed, varied (sizes, counts, overlaps,
categories), written as COCO JSON + JPEGs + shards in the documented layout."""
from __future__ import annotations

import io
import itertools
import json

from PIL import Image

from ddetr_dist import cli
from ddetr_dist.data import demo
from ddetr_dist.data.manifest import MANIFEST_NAME


def _images(seed, count):
    return [demo.make_image(seed, "train", i) for i in range(1, count + 1)]


def _jpeg(image):
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = _images(1, 5), _images(1, 5), _images(2, 5)
    assert [o for _, o in a] == [o for _, o in b] and [_jpeg(i) for i, _ in a] == [_jpeg(i) for i, _ in b]
    assert [o for _, o in a] != [o for _, o in c]
    assert demo.make_image(1, "train", 1)[1] != demo.make_image(1, "val", 1)[1]


def test_objects_are_varied_and_inside_their_images():
    images = _images(0, 80)
    sides, categories, overlapping = [], set(), 0
    for image, objects in images:
        assert demo.MIN_SIDE <= min(image.size) and max(image.size) <= demo.MAX_SIDE
        for o in objects:
            x, y, w, h = o["bbox"]
            assert -0.01 <= x and -0.01 <= y and x + w <= image.width + 0.01 and y + h <= image.height + 0.01
            assert 0 < o["area"] <= (w + 0.01) * (h + 0.01)  # both rounded to 2 decimals
            sides.append(max(w, h))
            categories.add(o["category_id"])
        overlapping += any(demo._overlap(p["bbox"], q["bbox"]) > 0 for p, q in itertools.combinations(objects, 2))
    assert min(sides) < 2 * demo.MIN_OBJECT and max(sides) > 150
    assert categories == {c[0] for c in demo.CATEGORIES}
    assert overlapping > 0
    assert len({image.size for image, _ in images}) > 40
    assert max(len(o) for _, o in images) > 4


def test_cli_writes_both_splits_as_coco_and_shards(tmp_path, capsys):
    assert cli.main(["demo-data", "--out", str(tmp_path), "--train", "12", "--val", "5", "--seed", "4",
                     "--images-per-shard", "5", "--workers", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for split, count in (("train", 12), ("val", 5)):
        coco = json.loads((tmp_path / split / "annotations.json").read_text())
        assert len(coco["images"]) == count and {"annotations", "categories", "info"} <= set(coco)
        for image in coco["images"]:
            with Image.open(tmp_path / split / "images" / image["file_name"]) as im:
                assert im.format == "JPEG" and im.size == (image["width"], image["height"])
        manifest = json.loads((tmp_path / split / "shards" / MANIFEST_NAME).read_text())
        assert sum(s["count"] for s in manifest["shards"]) == count
        assert manifest["num_classes"] == max(c[0] for c in demo.CATEGORIES) + 1
    assert f"data.train_shards={tmp_path / 'train' / 'shards'} " in printed
    # no model.num_classes to copy: `ddetr train` reads it from the manifest (auto)
    assert f"data.val_shards={tmp_path / 'val' / 'shards'}\n" in printed and "num_classes" not in printed
