"""inference: onnxruntime running the `ddetr export` graph vs. PyTorch eager, per image

The model (--checkpoint, else the --config's model with random weights; default the demo's)
is exported to a temporary file; then both run the same images, one at a time, at the
config's val size (data.val_scale, data.max_size), taking turns so that the machine's noise
falls on both alike, with the same number of threads. Prints milliseconds per image and
the ratio, measured in this one run. PyTorch runs the model as training builds it (the
compiled attention op when it builds, else its PyTorch form); onnxruntime runs its CPU
provider.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from ddetr_dist.config import COCO_NUM_CLASSES, DEMO_CONFIG, load_config
from ddetr_dist.data.transforms import resized_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, help="a trained model (default: random weights)")
    parser.add_argument("--config", default=None, help="YAML config: the model without --checkpoint, and the "
                        "val size (default: the demo's)")
    parser.add_argument("--images", type=int, default=10, help="images timed per runtime (default %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="threads of both runtimes (default: torch's)")
    parser.add_argument("overrides", nargs="*", default=[], help="section.key=value config overrides")


def load(args):
    """-> (cfg, model in eval mode)."""
    from ddetr_dist.engine.inference import load_trained
    from ddetr_dist.models import build_model

    if args.checkpoint:
        cfg, model, *_ = load_trained(args.checkpoint, args.config, args.overrides, DEMO_CONFIG)
        return cfg, model
    cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
    # random weights; a config that takes the class count from its data gets COCO's (no data read)
    classes = cfg.model.num_classes if isinstance(cfg.model.num_classes, int) else COCO_NUM_CLASSES
    torch.manual_seed(0)
    return cfg, build_model(dataclasses.replace(cfg.model, backbone_weights="", num_classes=classes))[0].eval()


def timed(call, images, padding_mask) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        call(images, padding_mask)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    from ddetr_dist.engine.onnx_export import export_onnx
    from ddetr_dist.engine.onnx_runtime import OnnxDetector

    cfg, model = load(args)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    width, height = resized_size(4 * cfg.data.val_scale // 3, cfg.data.val_scale, cfg.data.val_scale, cfg.data.max_size)
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    padding_mask = torch.zeros(1, height, width, dtype=torch.bool)
    with tempfile.TemporaryDirectory() as folder:
        print("exporting the model to ONNX (a minute or more) ...", flush=True)
        path = export_onnx(model, Path(folder) / "model.onnx", cfg, {})
        detector = OnnxDetector(path, threads=threads)
        for call in (model, detector):  # warm-up: first-call allocations and graph setup
            timed(call, images, padding_mask)
        seconds = {"pytorch": 0.0, "onnxruntime": 0.0}
        for i in range(args.images):
            seconds["pytorch"] += timed(model, images, padding_mask)
            seconds["onnxruntime"] += timed(detector, images, padding_mask)
            print(f"\r  {i + 1}/{args.images} images", end="", flush=True)
    print(f"\nimages of {height}x{width}, one at a time, {threads} thread(s), {args.images} each:")
    for name, total in seconds.items():
        print(f"  {name:<12} {1000 * total / args.images:8.1f} ms/image")
    print(f"  onnxruntime / pytorch time: {seconds['onnxruntime'] / seconds['pytorch']:.2f}x "
          f"(below 1: onnxruntime is faster)")
    return 0
