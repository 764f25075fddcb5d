"""Distributed COCO evaluation.

Every rank runs the exact-once eval loader over its share of the val shards, post-processes
to original-image pixels and keeps its detections; after the loop (ranks may hold one
batch more than another) they are gathered on rank 0 only, serialized as `detections.json`
(COCO results format) and scored with pycocotools' COCOeval (bbox). Rank 0 writes them
into the out dir; given none (Ray workers, which may not see the driver's file system) it
hands the bytes to its caller instead, to send where they are written. The ground truth is
read from the val shards' own JSON records (crowd regions included) or from a COCO
annotation file (`data.val_annotations`); both give the same numbers.

Memory: each rank holds its own detections once; rank 0 holds the gathered list until it
is serialized, then those bytes and pycocotools' copy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ddetr_dist.atomic import atomic_write_bytes
from ddetr_dist.config import Config, pad_multiple
from ddetr_dist import comm
from ddetr_dist.engine.run_dir import EvalDir

log = logging.getLogger("ddetr_dist.eval")
# COCOeval.stats, in order
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
REPORTED = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


@dataclass
class EvalResult:
    metrics: dict  # AP names -> value, 'val_loss', 'images', 'detections'
    per_category: dict = field(default_factory=dict)  # category name -> AP
    out_dir: Path | None = None
    # detections.json's bytes, on rank 0 of an evaluation given no out dir (its caller writes
    # them); never broadcast to the other ranks (tens of MB for COCO val)
    detections_json: bytes | None = field(default=None, repr=False)

    def table(self) -> str:
        lines = ["  ".join(f"{k:>6}" for k in REPORTED), "  ".join(f"{self.metrics[k]:6.3f}" for k in REPORTED)]
        if self.per_category:
            width = max(map(len, self.per_category))
            lines += ["", f"{'category':<{width}}  AP"]
            lines += [f"{name:<{width}}  {ap:.3f}" if ap == ap else f"{name:<{width}}  (no ground truth)"
                      for name, ap in self.per_category.items()]
        return "\n".join(lines)


# ------------------------------------------------------------------ ground truth


def ground_truth_from_shards(spec: str, allow_pipe: bool = False, manifest: str = "") -> dict:
    """A COCO dataset dict {images, annotations, categories} from the val shards' records."""
    from ddetr_dist.data import SkipCounter, load_shard_set
    from ddetr_dist.data.partition import Piece
    from ddetr_dist.data.streaming import read_piece

    shards = load_shard_set(spec, allow_pipe, manifest)
    images, annotations, skips = [], [], SkipCounter()
    for index, (url, count) in enumerate(zip(shards.urls, shards.counts)):
        for sample in read_piece(url, Piece(index, 0, count), skips):
            if "json" not in sample:
                continue  # counted by the loader as a missing part: it yields no detections either
            record = json.loads(sample["json"])
            images.append({"id": int(record["image_id"]), "width": record["width"], "height": record["height"],
                           "file_name": record.get("file_name", sample["__key__"])})
            for ann in record["annotations"]:
                annotations.append({"id": ann.get("id", len(annotations) + 1), "image_id": int(record["image_id"]),
                                    "category_id": ann["category_id"], "bbox": ann["bbox"], "area": ann["area"],
                                    "iscrowd": ann.get("iscrowd", 0)})
    if skips:
        log.warning("ground truth from %s: %s", spec, skips.summary())
    return {"images": images, "annotations": annotations, "categories": shards.categories}


def ground_truth(cfg: Config) -> dict:
    if cfg.data.val_annotations:
        path = Path(cfg.data.val_annotations)
        if not path.is_file():
            raise FileNotFoundError(f"data.val_annotations: {path} not found; give a COCO annotation file, "
                                    "or leave it empty to read the ground truth from the val shards")
        return json.loads(path.read_text())
    return ground_truth_from_shards(cfg.data.val_shards, cfg.data.allow_pipe_urls, cfg.data.val_manifest)


def coco_api(dataset: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco


# ------------------------------------------------------------------ detections


def to_coco_results(results: list[dict], image_ids: list[int]) -> list[dict]:
    """PostProcess output (xyxy pixels) -> COCO results (xywh), one dict per detection."""
    out = []
    for image_id, result in zip(image_ids, results):
        boxes = result["boxes"].float().cpu()
        boxes[:, 2:] -= boxes[:, :2]
        for score, label, box in zip(result["scores"].tolist(), result["labels"].tolist(), boxes.tolist()):
            out.append({"image_id": image_id, "category_id": int(label), "bbox": [round(v, 2) for v in box],
                        "score": round(score, 5)})
    return out


def _drop_crowd(target: dict) -> dict:
    keep = target["iscrowd"] == 0 if "iscrowd" in target else slice(None)
    return {**target, "boxes": target["boxes"][keep], "labels": target["labels"][keep]}


@torch.no_grad()
def run_detection(model, criterion, postprocess, loader, device, progress: bool,
                  lockstep: bool = False) -> tuple[list[dict], float, int]:
    """This rank's detections (COCO results), summed weighted val loss, and images seen.
    `lockstep`: every forward is collective (ZeRO-3 gathers parameters), so a rank with
    fewer batches runs empty forwards until every rank has run as many."""
    from tqdm import tqdm

    model.eval()
    if lockstep:
        batches_left = int(comm.all_reduce_max(len(loader)))
    detections: list[dict] = []
    loss_sum, images_seen = 0.0, 0
    for images, padding_mask, targets in tqdm(loader, desc="eval", disable=not progress, mininterval=2,
                                              unit="batch", leave=False):
        images, padding_mask = images.to(device), padding_mask.to(device)
        outputs = model(images, padding_mask)
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        detections += to_coco_results(postprocess(outputs, sizes), [int(t["image_id"]) for t in targets])
        if criterion is not None:
            # crowd regions are ignore regions for AP, never targets of the loss
            loss_targets = [{k: v.to(device) for k, v in _drop_crowd(t).items()} for t in targets]
            losses = criterion(outputs_to_float(outputs), loss_targets, sync=False)
            loss_sum += float(sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)) * len(targets)
        images_seen += len(targets)
        if lockstep:
            batches_left -= 1
    if lockstep and batches_left > 0:
        dummy = torch.zeros(1, 3, 64, 64, device=device)
        for _ in range(batches_left):
            model(dummy, torch.zeros(1, 64, 64, dtype=torch.bool, device=device))
    return detections, loss_sum, images_seen


def outputs_to_float(outputs):
    """The model's output tree in fp32: the matcher's costs and the focal loss are not safe
    in bf16/fp16."""
    if torch.is_tensor(outputs):
        return outputs.float()
    if isinstance(outputs, dict):
        return {k: outputs_to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(outputs_to_float(v) for v in outputs)
    return outputs


# ------------------------------------------------------------------ scoring


def score(gt: dict, detections: Path | bytes) -> tuple[dict, dict]:
    """COCOeval (bbox) of the detections (a COCO results file, or its bytes) -> (metrics,
    per-category AP)."""
    from pycocotools.cocoeval import COCOeval

    coco_gt = coco_api(gt)
    detections = json.loads(detections if isinstance(detections, bytes) else Path(detections).read_bytes())
    if not detections:  # pycocotools cannot load an empty result list
        return {name: 0.0 for name in STAT_NAMES}, {c["name"]: 0.0 for c in gt["categories"]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        del detections
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: max(0.0, float(v)) for name, v in zip(STAT_NAMES, evaluator.stats)}
    # precision [T IoUs, R recalls, K categories, A areas, M max dets]: area all, 100 dets
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_category = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k]
        name = coco_gt.cats[cat_id]["name"]
        per_category[name] = float(np.mean(p[p > -1])) if (p > -1).any() else float("nan")
    return metrics, per_category


def write_results(out_dir: Path, result: EvalResult, detections_json: bytes) -> None:
    """`out_dir/detections.json` (COCO results), then `out_dir/metrics.json` (last: it marks
    a finished evaluation, which the train loop looks for after a resume)."""
    files = EvalDir(out_dir)
    files.path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(files.detections, detections_json)
    saved = {"metrics": result.metrics, "per_category_AP": result.per_category}
    atomic_write_bytes(files.metrics, json.dumps(saved, indent=1).encode())


def evaluate(model, criterion, postprocess, cfg: Config, device, out_dir: Path | None, gt: dict | None = None,
             progress: bool = True, lockstep: bool = False) -> EvalResult:
    """Collective: every rank calls it. -> the same EvalResult on every rank; rank 0 writes
    `out_dir/detections.json` and `out_dir/metrics.json`. With `out_dir` None nothing is
    written: rank 0's result carries detections.json's bytes (`detections_json`) instead."""
    from ddetr_dist.data import build_eval_loader

    start = time.perf_counter()
    loader = build_eval_loader(cfg.data, pin_memory=device.type == "cuda", pad_to_multiple=pad_multiple(cfg))
    detections, loss_sum, images = run_detection(model, criterion, postprocess, loader, device,
                                                 progress and comm.get_rank() == 0, lockstep)
    loss_total, images_total = comm.all_reduce_sum([loss_sum, images])
    gathered = comm.gather_object(detections)
    del detections
    result = detections_json = None
    if comm.get_rank() == 0:
        count = sum(len(d) for d in gathered)
        detections_json = json.dumps([d for part in gathered for d in part]).encode()
        del gathered
        metrics, per_category = score(gt if gt is not None else ground_truth(cfg), detections_json)
        metrics.update({"val_loss": loss_total / max(images_total, 1), "images": int(images_total),
                        "detections": count, "eval_seconds": round(time.perf_counter() - start, 1)})
        result = EvalResult(metrics, per_category, None if out_dir is None else Path(out_dir))
        if out_dir is not None:
            write_results(out_dir, result, detections_json)
    result = comm.broadcast_object(result)  # without the bytes: the other ranks have no use for them
    if comm.get_rank() == 0 and out_dir is None:
        result = dataclasses.replace(result, detections_json=detections_json)
    return result
