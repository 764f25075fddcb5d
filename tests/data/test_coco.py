"""COCO reading and checking (shard time) and record -> target (load time)."""
from __future__ import annotations

import copy

import pytest
import torch

from ddetr_dist.data.coco import AnnotationError, SampleError, image_records, load_instances, record_to_target


def test_records_are_sorted_and_keep_images_without_annotations(tiny_coco):
    records, categories, degenerate = image_records(tiny_coco["instances"])
    assert [r["image_id"] for r in records] == sorted(i["id"] for i in tiny_coco["instances"]["images"])
    assert [c["id"] for c in categories] == [3, 7]
    assert any(not r["annotations"] for r in records)
    by_id = {r["image_id"]: r for r in records}
    assert sum(len(r["annotations"]) for r in records) == len(tiny_coco["instances"]["annotations"])
    assert {a["id"] for a in by_id[20]["annotations"]} == {3, 4, 5}
    assert len(degenerate) == 1 and "img2.jpg" in degenerate[0] and "annotation 4" in degenerate[0]  # zero width


@pytest.mark.parametrize("break_it, message", [
    (lambda d: d["annotations"][0].update(category_id=99), "unknown category id 99"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "bbox must be 4 finite numbers"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 3]), "bbox must be 4 finite numbers"),
    (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image id"),
    (lambda d: d["annotations"][0].update(image_id=12345), "is not in 'images'"),
    (lambda d: d["images"][0].pop("width"), "missing width"),
])
def test_problems_name_the_image(tiny_coco, break_it, message):
    instances = copy.deepcopy(tiny_coco["instances"])
    break_it(instances)
    with pytest.raises(AnnotationError, match=message) as info:
        image_records(instances, "instances.json")
    assert "img1.jpg" in str(info.value) or "annotation 1" in str(info.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(AnnotationError, match="annotation file not found"):
        load_instances(tmp_path / "nope.json")


def _record(tiny_coco, image_id):
    records, _, _ = image_records(tiny_coco["instances"])
    return next(r for r in records if r["image_id"] == image_id)


def test_target_clamps_to_the_image_and_drops_empty_boxes(tiny_coco):
    target, dropped = record_to_target(_record(tiny_coco, 10), frozenset({3, 7}), keep_crowd=False)
    # annotation 2 ([30, 20, 20, 20] in a 40x30 image) is clamped at the right and bottom edges
    assert target["boxes"].tolist() == [[2, 3, 12, 11], [30, 20, 40, 30]]
    assert target["labels"].tolist() == [3, 7] and dropped == 0
    assert target["orig_size"].tolist() == target["size"].tolist() == [30, 40]
    assert target["image_id"].tolist() == [10] and target["image_id"].dtype == torch.int64


def test_target_crowd_regions_dropped_for_training_kept_for_eval(tiny_coco):
    record = _record(tiny_coco, 20)
    train, dropped = record_to_target(record, frozenset({3, 7}), keep_crowd=False)
    assert train["iscrowd"].tolist() == [0] and dropped == 1  # the zero-width box
    evaluation, _ = record_to_target(record, frozenset({3, 7}), keep_crowd=True)
    assert evaluation["iscrowd"].tolist() == [1, 0] and evaluation["area"].tolist() == [300, 25]


def test_target_with_unknown_category_is_a_sample_error(tiny_coco):
    with pytest.raises(SampleError) as info:
        record_to_target(_record(tiny_coco, 10), frozenset({3}), keep_crowd=False)
    assert info.value.reason == "unknown_category"


def test_image_without_annotations_gives_empty_tensors(tiny_coco):
    target, _ = record_to_target(_record(tiny_coco, 30), frozenset({3, 7}), keep_crowd=False)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


@pytest.mark.parametrize("bbox", [[1, 2, 3], [[1, 2], [3, 4]], "wide"])
def test_malformed_record_is_a_bad_json_sample_error(tiny_coco, bbox):
    record = copy.deepcopy(_record(tiny_coco, 10))
    for ann in record["annotations"]:
        ann["bbox"] = bbox
    with pytest.raises(SampleError) as info:
        record_to_target(record, frozenset({3, 7}), keep_crowd=False)
    assert info.value.reason == "bad_json"
