"""COCO evaluation: our scoring equals pycocotools run directly, perfect and empty
detections score 1 and 0, the ground truth from the shards equals the annotation file, and
2 ranks x 2 loader workers see every image once, as 1 rank does."""
from __future__ import annotations

import contextlib
import io
import json
import random

import pytest
import torch

from ddetr_dist.engine.evaluate import STAT_NAMES, ground_truth, ground_truth_from_shards, score

from .engine_helpers import run_evaluation, tiny_config


def pycocotools_stats(annotation_file, detections):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
        evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(STAT_NAMES, evaluator.stats))


def noisy_detections(gt: dict, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        jitter = [rng.uniform(-0.15, 0.15) * s for s in (w, h, w, h)]
        label = ann["category_id"] if rng.random() > 0.2 else rng.choice([c["id"] for c in gt["categories"]])
        out.append({"image_id": ann["image_id"], "category_id": label, "score": rng.random(),
                    "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])]})
    return out


def test_scores_equal_pycocotools_on_the_same_detections(tiny_data, tmp_path):
    gt = ground_truth_from_shards(str(tiny_data / "val" / "shards"))
    detections = noisy_detections(gt)
    (tmp_path / "detections.json").write_text(json.dumps(detections))
    ours, per_category = score(gt, tmp_path / "detections.json")
    direct = pycocotools_stats(tiny_data / "val" / "annotations.json", detections)
    assert 0.05 < ours["AP50"] < 0.99  # a real test: neither trivial end
    for name in STAT_NAMES:
        assert ours[name] == pytest.approx(max(0.0, direct[name]), abs=1e-12), name
    assert set(per_category) == {c["name"] for c in gt["categories"]}


def test_perfect_detections_score_1_and_none_score_0(tiny_data, tmp_path):
    gt = ground_truth_from_shards(str(tiny_data / "val" / "shards"))
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"] if not a["iscrowd"]]
    (tmp_path / "perfect.json").write_text(json.dumps(perfect))
    assert score(gt, tmp_path / "perfect.json")[0]["AP"] == pytest.approx(1.0)
    (tmp_path / "none.json").write_text("[]")
    metrics, per_category = score(gt, tmp_path / "none.json")
    assert metrics["AP"] == 0.0 and metrics["AR100"] == 0.0 and set(per_category.values()) == {0.0}


def test_ground_truth_from_shards_equals_the_annotation_file(tiny_data, tmp_path):
    from_shards = ground_truth(tiny_config(tiny_data, tmp_path))
    from_file = ground_truth(tiny_config(tiny_data, tmp_path, f"data.val_annotations={tiny_data}/val/annotations.json"))
    detections = noisy_detections(from_file, seed=3)
    (tmp_path / "d.json").write_text(json.dumps(detections))
    assert score(from_shards, tmp_path / "d.json") == score(from_file, tmp_path / "d.json")


def test_two_ranks_with_two_loader_workers_see_every_image_once(tiny_data, tmp_path):
    one = run_evaluation(tiny_config(tiny_data, tmp_path, "data.num_workers=0"), 1, tmp_path / "one")
    two = run_evaluation(tiny_config(tiny_data, tmp_path, "data.num_workers=2"), 2, tmp_path / "two")
    assert one["metrics"]["images"] == two["metrics"]["images"] == 8
    key = lambda d: (d["image_id"], d["category_id"], d["score"], d["bbox"])  # noqa: E731
    assert sorted(map(key, one["detections"])) == sorted(map(key, two["detections"]))
    assert {d["image_id"] for d in two["detections"]} == set(range(1, 9))
    assert one["metrics"]["AP"] == two["metrics"]["AP"]
    assert one["metrics"]["val_loss"] == pytest.approx(two["metrics"]["val_loss"], rel=1e-5)
    assert torch.isfinite(torch.tensor(one["metrics"]["val_loss"]))


class ShapeRecorder(torch.nn.Module):
    """The model, noting the height and width of every batch it is given."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.shapes = model, []

    def forward(self, images, padding_mask):
        self.shapes.append(tuple(images.shape[-2:]))
        return self.model(images, padding_mask)


def test_evaluation_and_prediction_pad_their_batches_as_training_did(tiny_data, tmp_path):
    # the demo trained on batches padded to multiples of 64 (train.compile's default) scored
    # AP50 0.586 on val batches padded alike and 0.424 on unpadded ones: a model learns its padding
    from PIL import Image

    from ddetr_dist.data import build_val_transform
    from ddetr_dist.engine.evaluate import evaluate
    from ddetr_dist.engine.pictures import PredictionPictures
    from ddetr_dist.models import build_model
    from ddetr_dist.predict import predict_one

    cfg = tiny_config(tiny_data, tmp_path, "data.num_workers=0", "data.pad_to_multiple=64")
    model, criterion, postprocess = build_model(cfg)
    recorder = ShapeRecorder(model.eval())
    evaluate(recorder, criterion, postprocess, cfg, torch.device("cpu"), None, progress=False)
    PredictionPictures(cfg, count=2).render(recorder, postprocess, torch.device("cpu"))
    Image.new("RGB", (90, 70), "white").save(tmp_path / "photo.jpg")
    predict_one(tmp_path / "photo.jpg", recorder, postprocess, build_val_transform(cfg.data), 0.5, {},
                pad_to_multiple=64)
    assert len(recorder.shapes) >= 3
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in recorder.shapes), recorder.shapes
