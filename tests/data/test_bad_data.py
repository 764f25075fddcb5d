"""Bad data at load time is skipped, counted by reason, logged, and reported through
`loader.skips` (also from worker processes); the good samples still arrive."""
from __future__ import annotations

import json
import logging
import tarfile

import pytest
import webdataset as wds

from data_helpers import image_ids, jpeg_bytes, small_cfg
from ddetr_dist.data import build_eval_loader, build_train_loader
from ddetr_dist.data.manifest import FORMAT, num_classes_for, write_manifest

CATEGORIES = [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}]


def _record(image_id, width=32, height=24, annotations=None):
    anns = annotations if annotations is not None else [
        {"id": image_id, "bbox": [2, 2, 10, 10], "category_id": 1, "area": 100, "iscrowd": 0}]
    return {"image_id": image_id, "file_name": f"{image_id}.jpg", "width": width, "height": height,
            "annotations": anns}


def _sample(record, image=None, **parts):
    sample = {"__key__": f"{record['image_id']:06d}", "jpg": image or jpeg_bytes(record["width"], record["height"]),
              "json": json.dumps(record).encode()}
    sample.update(parts)
    return {k: v for k, v in sample.items() if v is not None}


def _write_tar(path, samples):
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False) as tar:
        for sample in samples:
            tar.write(sample)


@pytest.fixture
def bad_shards(tmp_path):
    """good.tar: 3 good samples. bad.tar: one sample of each kind of bad content, plus one
    with a degenerate box next to a good one. cut.tar: 4 samples cut inside the third."""
    _write_tar(tmp_path / "a-good.tar", [_sample(_record(i)) for i in (1, 2, 3)])
    degenerate = [{"id": 1, "bbox": [2, 2, 10, 10], "category_id": 2, "area": 100, "iscrowd": 0},
                  {"id": 2, "bbox": [40, 2, 10, 10], "category_id": 1, "area": 100, "iscrowd": 0}]  # outside
    _write_tar(tmp_path / "b-bad.tar", [
        _sample(_record(10), image=b"\xff\xd8not a jpeg"),                       # corrupt_image
        _sample(_record(11), json=None),                                        # missing_part
        _sample(_record(12), json=b"{not json"),                                # bad_json
        _sample(_record(13, annotations=[{"id": 1, "bbox": [1, 1, 5, 5], "category_id": 9, "area": 25,
                                          "iscrowd": 0}])),                     # unknown_category
        _sample(_record(14, annotations=degenerate)),                          # kept, dropped_box
        _sample(_record(15), image=jpeg_bytes(33, 24)),                         # corrupt_image (size)
    ])
    _write_tar(tmp_path / "c-cut.tar", [_sample(_record(i)) for i in (20, 21, 22, 23)])
    with tarfile.open(tmp_path / "c-cut.tar") as tar:
        third_image = next(m for m in tar.getmembers() if m.name == "000022.jpg")
    data = (tmp_path / "c-cut.tar").read_bytes()
    (tmp_path / "c-cut.tar").write_bytes(data[: third_image.offset_data + 100])
    write_manifest(tmp_path, {"format": FORMAT, "categories": CATEGORIES, "num_classes": num_classes_for(CATEGORIES),
                              "shards": [{"name": "a-good.tar", "count": 3}, {"name": "b-bad.tar", "count": 6},
                                         {"name": "c-cut.tar", "count": 4}]})
    return f"{tmp_path}/{{a-good,b-bad,c-cut}}.tar"


EXPECTED_SKIPS = {"corrupt_image": 2, "missing_part": 1, "bad_json": 1, "unknown_category": 1, "dropped_box": 1,
                  "unreadable_shard": 1}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_skips_are_counted_by_reason_and_good_samples_arrive(bad_shards, num_workers):
    loader = build_eval_loader(small_cfg(val_shards=bad_shards, num_workers=num_workers), rank=0, world_size=1)
    batches = list(loader)
    assert sorted(image_ids(batches)) == [1, 2, 3, 14, 20, 21]
    assert dict(loader.skips.counts) == EXPECTED_SKIPS
    target = next(t for b in batches for t in b[2] if int(t["image_id"]) == 14)
    assert target["labels"].tolist() == [2]  # the box outside the image was dropped, the sample kept


def test_skips_are_logged_with_the_sample_and_summed_per_epoch(bad_shards, caplog):
    loader = build_eval_loader(small_cfg(val_shards=bad_shards), rank=0, world_size=1)
    with caplog.at_level(logging.WARNING):
        list(loader)
    text = caplog.text
    assert "skipped (corrupt_image): 000010" in text and "skipped (unreadable_shard)" in text and "c-cut.tar" in text
    assert "eval loader, rank 0, epoch 0: " + loader.skips.summary() in text


def test_training_survives_bad_data_and_keeps_equal_batches(bad_shards):
    cfg = small_cfg(train_shards=bad_shards, num_workers=2, samples_per_epoch=24)
    loader = build_train_loader(cfg, seed=0, rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 24 // cfg.batch_size
    assert set(image_ids(batches)) <= {1, 2, 3, 14, 20, 21}
    assert set(loader.skips.counts) == set(EXPECTED_SKIPS)


def test_training_on_nothing_usable_stops_with_an_error(tmp_path):
    _write_tar(tmp_path / "x.tar", [_sample(_record(i), image=b"garbage") for i in range(3)])
    write_manifest(tmp_path, {"format": FORMAT, "categories": CATEGORIES, "shards": [{"name": "x.tar", "count": 3}]})
    loader = build_train_loader(small_cfg(train_shards=str(tmp_path / "x.tar")), seed=0, rank=0, world_size=1)
    with pytest.raises(RuntimeError, match="could not be used"):
        list(loader)
