"""`ddetr shard`: one sample per image with its original bytes, a manifest written last,
atomic shards, resuming, and clear errors naming the bad image."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_helpers import write_instances
from ddetr_dist import cli
from ddetr_dist.data.coco import image_records
from ddetr_dist.data.manifest import FORMAT, MANIFEST_NAME
from ddetr_dist.data.shard import ShardError, plan_shards, write_shards


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_shards_hold_original_bytes_and_records(tiny_coco):
    manifest = write_shards(tiny_coco["images"], tiny_coco["annotations"], tiny_coco["out"], prefix="t",
                            max_count=3, workers=1, progress=False)
    assert [s["count"] for s in manifest["shards"]] == [3, 1]
    assert manifest["format"] == FORMAT and manifest["num_samples"] == 4
    assert manifest["num_classes"] == 8  # max category id 7 + 1
    assert [c["id"] for c in manifest["categories"]] == [3, 7]
    assert manifest["num_images_without_annotations"] == 1 and manifest["num_degenerate_boxes"] == 1
    assert manifest["source_annotations"]["sha256"] == hashlib.sha256(tiny_coco["annotations"].read_bytes()).hexdigest()
    assert json.loads((tiny_coco["out"] / MANIFEST_NAME).read_text()) == manifest

    records, _, _ = image_records(tiny_coco["instances"])
    members = {}
    for shard in manifest["shards"]:
        path = tiny_coco["out"] / shard["name"]
        assert path.stat().st_size == shard["bytes"]
        members.update(_members(path))
    assert len(members) == 2 * len(records)
    for record in records:
        key = f"{record['image_id']:012d}"
        assert members[f"{key}.jpg"] == (tiny_coco["images"] / record["file_name"]).read_bytes()
        assert json.loads(members[f"{key}.json"]) == record


def test_plan_respects_count_and_size():
    assert [list(r) for r in plan_shards([10] * 7, max_count=3, max_size=10**9)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [list(r) for r in plan_shards([40, 40, 40, 100, 5], max_count=99, max_size=100)] == [[0, 1], [2], [3], [4]]


def test_crash_leaves_no_half_shard_and_rerun_resumes(tiny_coco):
    images, out = tiny_coco["images"], tiny_coco["out"]
    good = (images / "img3.jpg").read_bytes()
    (images / "img3.jpg").write_bytes(good[: len(good) // 2])  # id 30: first image of the second shard
    with pytest.raises(ShardError, match="img3.jpg"):
        write_shards(images, tiny_coco["annotations"], out, prefix="t", max_count=2, workers=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["t-000000.tar"]  # no temp file, no manifest
    first = out / "t-000000.tar"
    assert len(_members(first)) == 4
    before = first.stat()

    (images / "img3.jpg").write_bytes(good)
    manifest = write_shards(images, tiny_coco["annotations"], out, prefix="t", max_count=2, workers=2, progress=False)
    after = first.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # kept, not rewritten
    assert [s["name"] for s in manifest["shards"]] == ["t-000000.tar", "t-000001.tar"]
    assert (out / MANIFEST_NAME).is_file()

    # a shard that is not whole (or holds other samples) is written again
    first.write_bytes(first.read_bytes()[:1024])
    write_shards(images, tiny_coco["annotations"], out, prefix="t", max_count=2, workers=1, progress=False)
    assert len(_members(first)) == 4


def _noise_jpeg() -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, size=(30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("problem", ["corrupt", "truncated", "missing", "wrong_size", "png_as_jpg_ok"])
def test_bad_images_are_errors_naming_them(tiny_coco, problem, capsys):
    path = tiny_coco["images"] / "img1.jpg"  # annotated 40x30
    if problem == "corrupt":
        path.write_bytes(b"\xff\xd8 this is not a jpeg" * 10)
    elif problem == "truncated":
        path.write_bytes(_noise_jpeg()[:300])
    elif problem == "missing":
        path.unlink()
    elif problem == "wrong_size":
        Image.new("RGB", (41, 30)).save(path, format="JPEG")
    else:  # a PNG under a .jpg name is a fine image: stored with its real extension
        Image.new("RGB", (40, 30)).save(path, format="PNG")
    argv = ["shard", "--images", str(tiny_coco["images"]), "--annotations", str(tiny_coco["annotations"]),
            "--out", str(tiny_coco["out"]), "--workers", "2", "--no-progress"]  # errors cross the pool
    code = cli.main(argv)
    err = capsys.readouterr().err
    if problem == "png_as_jpg_ok":
        assert code == 0
        assert "000000000010.png" in _members(tiny_coco["out"] / "shard-000000.tar")
        return
    assert code == 1 and "img1.jpg" in err and "id 10" in err
    assert not (tiny_coco["out"] / MANIFEST_NAME).exists()


def test_unknown_category_and_missing_annotations_are_errors(tiny_coco, capsys):
    instances = json.loads(tiny_coco["annotations"].read_text())
    instances["annotations"][-1]["category_id"] = 5
    write_instances(tiny_coco, instances)
    argv = ["shard", "--images", str(tiny_coco["images"]), "--out", str(tiny_coco["out"]), "--no-progress"]
    assert cli.main(argv + ["--annotations", str(tiny_coco["annotations"])]) == 1
    err = capsys.readouterr().err
    assert "img4.jpg" in err and "unknown category id 5" in err
    assert cli.main(argv + ["--annotations", str(tiny_coco["annotations"]) + ".missing"]) == 1
    assert "annotation file not found" in capsys.readouterr().err


def test_cli_reports_num_classes_and_names_degenerate_boxes(tiny_coco, capsys):
    argv = ["shard", "--images", str(tiny_coco["images"]), "--annotations", str(tiny_coco["annotations"]),
            "--out", str(tiny_coco["out"]), "--no-progress"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "8 classes (max category id + 1)" in out and "model.num_classes=auto" in out
    assert "1 box(es) have no area" in err and "img2.jpg" in err
