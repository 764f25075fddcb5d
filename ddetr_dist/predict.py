"""Detect objects in images with a trained model.

  ddetr predict IMAGE_OR_DIR... --checkpoint PATH [--threshold 0.5] [--out DIR] [--config FILE] [section.key=value ...]
  ddetr predict IMAGE_OR_DIR... --onnx MODEL.onnx [the same options]

For every image (a directory means every image file in it): `<out>/<name>.json` with the
detections above --threshold (boxes [x0, y0, x1, y1] in the image's pixels, class names
from the manifest of the config's shards) and `<out>/<name>.png`, the image with the boxes
drawn. Any size and mode (grey, RGBA, palette, 16-bit); EXIF-rotated JPEGs are turned
upright first. An unreadable file is reported by name and the others are still processed;
the exit code is 1 if any file failed. Config overrides are positional `section.key=value`
items, as for the other commands; an image whose name looks like one is given as ./NAME.

--onnx runs a `ddetr export` file with onnxruntime instead of PyTorch (pip install
'ddetr_dist[export]'), with the same pre- and post-processing; the file carries its val
transform and category names (--config and overrides still apply).

examples:
  ddetr predict photos/ --checkpoint runs/demo-20261125-101500/model_final.pth --out predictions
  ddetr predict a.jpg b.png --checkpoint runs/demo-20261125-101500 data.val_scale=640
  ddetr predict photos/ --onnx demo.onnx --threshold 0.3
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ddetr_dist.atomic import atomic_open, atomic_write_bytes
from ddetr_dist.config import DEMO_CONFIG, ConfigError, is_override, pad_multiple
from ddetr_dist.models import CheckpointMismatchError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # one positional list: its section.key=value items are overrides (is_override), the rest images
    parser.usage = "%(prog)s IMAGE_OR_DIR... (--checkpoint PATH | --onnx FILE) [options] [section.key=value ...]"
    parser.add_argument("items", nargs="+", metavar="IMAGE_OR_DIR",
                        help="image files or directories of images, and section.key=value config overrides")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="official .pth, model_final.pth, run or checkpoint dir")
    model.add_argument("--onnx", help="a model written by `ddetr export`, run with onnxruntime")
    parser.add_argument("--threshold", type=float, default=0.5, help="keep detections scoring at least this")
    parser.add_argument("--out", default="predictions", help="output directory (default: %(default)s)")
    parser.add_argument("--config", default=None,
                        help="YAML config (default: the run's, else the demo's; with --onnx: the file's)")
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)  # deprecated


def image_files(inputs: list[str]) -> list[Path]:
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)  # missing or unreadable: reported when it is opened
    return files


def read_image(path: Path) -> Image.Image:
    """Upright (EXIF orientation applied) RGB, whatever the mode."""
    with Image.open(path) as image:
        image.load()
        upright = ImageOps.exif_transpose(image)
        if upright.mode in ("RGBA", "LA", "P"):  # composite transparency onto white, not black
            rgba = upright.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        if upright.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale to 8 bits
            return upright.point(lambda v: v / 256).convert("L").convert("RGB")
        return upright.convert("RGB")


@torch.no_grad()
def predict_one(path: Path, model, postprocess, transform, threshold: float, names: dict, *,
                pad_to_multiple: int) -> tuple[dict, Image.Image]:
    """`pad_to_multiple`: as the model's training batches were (config.pad_multiple)."""
    from ddetr_dist.data import collate
    from ddetr_dist.engine.draw import draw_boxes

    image = read_image(path)
    size = torch.tensor([image.height, image.width])
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "area": torch.zeros(0),
              "iscrowd": torch.zeros(0, dtype=torch.int64), "orig_size": size, "size": size.clone()}
    images, padding_mask, _ = collate([transform(image, target, random.Random(0))], pad_to_multiple)
    result = postprocess(model(images, padding_mask), size[None])[0]
    keep = result["scores"] >= threshold
    detections = [{"bbox": [round(v, 1) for v in box], "label": int(label), "category": names.get(int(label), str(int(label))),
                   "score": round(float(score), 4)}
                  for box, label, score in zip(result["boxes"][keep].tolist(), result["labels"][keep].tolist(),
                                               result["scores"][keep].tolist())]
    record = {"image": str(path), "width": image.width, "height": image.height, "detections": detections}
    return record, draw_boxes(image, detections, names)


def load_detector(args: argparse.Namespace, overrides: list[str]):
    """-> (cfg, model, postprocess, category names, where the weights came from): the PyTorch
    model of --checkpoint, or onnxruntime running --onnx (called alike)."""
    from ddetr_dist.config import load_config, with_overrides
    from ddetr_dist.engine.inference import category_names, load_trained
    from ddetr_dist.models.postprocess import PostProcess

    if args.checkpoint is not None:
        cfg, model, _, postprocess, weights = load_trained(args.checkpoint, args.config, overrides, DEMO_CONFIG)
        return cfg, model, postprocess, category_names(cfg), weights
    from ddetr_dist.engine.onnx_runtime import OnnxDetector

    model = OnnxDetector(args.onnx)
    cfg = load_config(args.config) if args.config else model.config() or load_config(DEMO_CONFIG)
    cfg = with_overrides(cfg, overrides)
    return cfg, model, PostProcess(), model.category_names() or category_names(cfg), model.path


def run(args: argparse.Namespace) -> int:
    from ddetr_dist.data import build_val_transform

    if args.override:
        print("ddetr predict: --override is deprecated: give overrides as section.key=value, as the other commands "
              "take them", file=sys.stderr)
    overrides = args.override + [item for item in args.items if is_override(item)]
    inputs = [item for item in args.items if not is_override(item)]
    if not inputs:
        print("ddetr predict: no images given (section.key=value items are config overrides; an image named like "
              "one: ./NAME)", file=sys.stderr)
        return 2
    try:
        cfg, model, postprocess, names, weights = load_detector(args, overrides)
    except (ConfigError, CheckpointMismatchError, FileNotFoundError, ValueError, ImportError) as e:
        hint = " (an image named like an override: ./NAME)" if str(e).startswith("unknown config key") else ""
        print(f"ddetr predict: {e}{hint}", file=sys.stderr)
        return 2
    transform = build_val_transform(cfg.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    files = image_files(inputs)
    for path in files:
        try:
            record, picture = predict_one(path, model, postprocess, transform, args.threshold, names,
                                          pad_to_multiple=pad_multiple(cfg))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            failed.append(path)
            print(f"ddetr predict: cannot read {path}: {e}", file=sys.stderr)
            continue
        atomic_write_bytes(out / f"{path.stem}.json", json.dumps(record, indent=1).encode())
        with atomic_open(out / f"{path.stem}.png") as f:
            picture.save(f, format="PNG")
        print(f"{path}: {len(record['detections'])} detections -> {out / path.stem}.json, .png")
    print(f"{len(files) - len(failed)} of {len(files)} images done with {weights}"
          + (f"; {len(failed)} failed: {', '.join(map(str, failed))}" if failed else ""))
    return 1 if failed or not files else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddetr_dist.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
