"""COCO detection annotations: reading and checking an instances JSON (at shard time), and
turning one image's record into a training target (at load time), as the official
`ConvertCocoPolysToMask` does: xywh -> xyxy, clamp to the image, drop empty boxes, and
(for training) drop crowd regions. Category ids are kept as labels (COCO's sparse ids)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

class AnnotationError(ValueError):
    """The annotation file is missing or its content is unusable (message names the image)."""


class SampleError(ValueError):
    """One sample cannot be used; `reason` is a key of `skips.REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def load_instances(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_bytes())
    except ValueError as e:
        raise AnnotationError(f"{path}: not valid JSON: {e}") from e


def _degenerate(bbox: list, width: int, height: int) -> bool:
    """True when the box has no area once clamped to the image (what the loader drops)."""
    x, y, w, h = bbox
    return min(x + w, width) <= max(x, 0) or min(y + h, height) <= max(y, 0)


def image_records(instances: dict, source: str = "annotations") -> tuple[list[dict], list[dict], list[str]]:
    """(records sorted by image id, categories, degenerate boxes named) of a COCO
    instances dict. A record is what a shard stores as the sample's JSON:
    {image_id, file_name, width, height, annotations: [{id, bbox, category_id, area, iscrowd}]}.

    Raises AnnotationError listing every problem (naming the image): missing fields,
    duplicate ids, unknown category ids, malformed boxes. Degenerate boxes (zero or negative
    size, or outside the image) are counted and kept: the loader drops them as the official
    code does, and evaluation against the original file still sees them."""
    problems: list[str] = []
    for key in ("images", "annotations", "categories"):
        if not isinstance(instances.get(key), list):
            raise AnnotationError(f"{source}: no '{key}' list; is this a COCO instances file?")
    categories = [{"id": c["id"], "name": c.get("name", str(c["id"])),
                   **({"supercategory": c["supercategory"]} if "supercategory" in c else {})}
                  for c in instances["categories"]]
    category_ids = {c["id"] for c in categories}
    if not all(isinstance(i, int) and i >= 0 for i in category_ids):
        raise AnnotationError(f"{source}: category ids must be non-negative integers")

    records: dict[int, dict] = {}
    for image in instances["images"]:
        image_id = image.get("id")
        if not isinstance(image_id, int) or image_id < 0:
            problems.append(f"image {image.get('file_name', '?')}: id must be a non-negative integer, got {image_id!r}")
            continue
        if image_id in records:
            problems.append(f"image {image.get('file_name', '?')}: duplicate image id {image_id}")
            continue
        missing = [k for k in ("file_name", "width", "height") if k not in image]
        if missing:
            problems.append(f"image id {image_id}: missing {', '.join(missing)}")
            continue
        records[image_id] = {"image_id": image_id, "file_name": image["file_name"],
                             "width": int(image["width"]), "height": int(image["height"]), "annotations": []}

    degenerate: list[str] = []
    for ann in instances["annotations"]:
        record = records.get(ann.get("image_id"))
        if record is None:
            problems.append(f"annotation {ann.get('id')}: image id {ann.get('image_id')!r} is not in 'images'")
            continue
        name = f"image {record['file_name']} (id {record['image_id']}), annotation {ann.get('id')}"
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
            problems.append(f"{name}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
            continue
        if ann.get("category_id") not in category_ids:
            problems.append(f"{name}: unknown category id {ann.get('category_id')!r} "
                            f"(known: {sorted(category_ids)})")
            continue
        if _degenerate(bbox, record["width"], record["height"]):
            degenerate.append(f"{name}: bbox {bbox}")
        record["annotations"].append({"id": ann.get("id"), "bbox": [float(v) for v in bbox],
                                      "category_id": ann["category_id"],
                                      "area": float(ann.get("area", bbox[2] * bbox[3])),
                                      "iscrowd": int(ann.get("iscrowd", 0))})
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise AnnotationError(f"{source}: {len(problems)} problem(s):\n  {shown}{more}")
    return [records[k] for k in sorted(records)], categories, degenerate


def record_to_target(record: dict, category_ids: frozenset[int], keep_crowd: bool) -> tuple[dict, int]:
    """(target, number of boxes dropped as degenerate) for one record.

    target: boxes float32 [K,4] xyxy in pixels (clamped), labels int64 [K] (category ids),
    area float32 [K], iscrowd int64 [K], image_id int64 [1], orig_size and size int64 (h, w).
    Crowd regions are dropped unless `keep_crowd` (training drops them, as official;
    evaluation keeps them flagged so COCO AP can treat them as ignore regions).
    Raises SampleError for a malformed record or an unknown category id."""
    try:
        width, height, image_id = int(record["width"]), int(record["height"]), int(record["image_id"])
        anns = [a for a in record["annotations"] if keep_crowd or not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        if anns and boxes.shape != (len(anns), 4):
            raise ValueError(f"a bbox is not [x, y, w, h] (boxes of shape {tuple(boxes.shape)})")
        boxes = boxes.reshape(len(anns), 4)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        area = torch.tensor([a["area"] for a in anns], dtype=torch.float32)
        iscrowd = torch.tensor([a.get("iscrowd", 0) for a in anns], dtype=torch.int64)
    except (KeyError, TypeError, ValueError) as e:
        raise SampleError("bad_json", f"malformed record: {e!r}") from e
    unknown = sorted(set(labels.tolist()) - category_ids)
    if unknown:
        raise SampleError("unknown_category", f"category ids {unknown} are not in the manifest")
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    size = torch.tensor([height, width], dtype=torch.int64)
    target = {"boxes": boxes[keep], "labels": labels[keep], "area": area[keep], "iscrowd": iscrowd[keep],
              "image_id": torch.tensor([image_id], dtype=torch.int64), "orig_size": size, "size": size.clone()}
    return target, int((~keep).sum())
