"""Export a trained model to ONNX, for deployment outside PyTorch.

  ddetr export --checkpoint PATH --out model.onnx [--opset N] [--detections] [--config FILE] [section.key=value ...]

PATH: a released official checkpoint, our model_final.pth, a run directory (its newest
checkpoint) or one checkpoint folder; the model's shape comes from the checkpoint, the
config (--config, else the run's config.yaml, else configs/demo.yaml) gives the val
transform and the category names, which the file carries for `ddetr predict --onnx`.

The graph takes `images` [B,3,H,W] (normalised as the val transform does) and
`padding_mask` [B,H,W] (bool, True = padding), any batch size and any height and width
above a minimum it prints (the coarsest feature level must be 2 pixels); it returns
`logits` [B,Q,C] (sigmoid gives the class scores) and `boxes` [B,Q,4] (cx, cy, w, h in 0..1
of each image's unpadded part). --detections adds the input `orig_sizes` [B,2] (h, w) and
the outputs `scores`, `labels`, `boxes_xyxy` (the best 100 per image, in orig_sizes pixels).
The deformable attention is exported as ONNX GridSample (opset >= 16): no custom operator.
After writing, the file is run with onnxruntime at two image sizes other than the export's
and compared with PyTorch (skipped, with a note, if onnxruntime is not installed).

Needs the export extra: pip install 'ddetr_dist[export]'. docs/export.md: runtimes, TensorRT.

examples:
  ddetr export --checkpoint runs/demo/model_final.pth --out demo.onnx
  ddetr export --checkpoint r50_deformable_detr-checkpoint.pth --config configs/base.yaml --out r50.onnx --detections
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from ddetr_dist.config import DEMO_CONFIG, ConfigError
from ddetr_dist.models import CheckpointMismatchError

# (height, width) the written file is checked at: not the export's example size (192x256)
CHECK_SIZES = [(160, 224), (288, 200)]
TOLERANCE = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ddetr_dist.engine.onnx_export import DEFAULT_OPSET, MIN_OPSET

    parser.add_argument("--checkpoint", required=True, help="official .pth, model_final.pth, run or checkpoint dir")
    parser.add_argument("--out", required=True, help="the ONNX file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (at least {MIN_OPSET}; default %(default)s)")
    parser.add_argument("--detections", action="store_true",
                        help="also output the post-processed detections (adds the input orig_sizes)")
    parser.add_argument("--config", default=None, help="YAML config (default: the run's, else the demo's)")
    parser.add_argument("overrides", nargs="*", default=[], help="section.key=value config overrides")


def run(args: argparse.Namespace) -> int:
    from ddetr_dist.engine.inference import category_names, load_trained
    from ddetr_dist.engine.onnx_export import export_onnx, smallest_side

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, model, _, _, weights = load_trained(args.checkpoint, args.config, args.overrides, DEMO_CONFIG)
        start = time.perf_counter()
        print(f"exporting {weights} (opset {args.opset}) ...", flush=True)
        out = export_onnx(model, args.out, cfg, category_names(cfg), args.opset, args.detections)
    except ImportError as e:
        print(f"ddetr export: {e}. Install the export extra: pip install 'ddetr_dist[export]'", file=sys.stderr)
        return 2
    except (ConfigError, CheckpointMismatchError, FileNotFoundError, ValueError) as e:
        print(f"ddetr export: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the graph came out with fixed sizes (onnx_export.check_dynamic)
        print(f"ddetr export: {e}", file=sys.stderr)
        return 1
    side = smallest_side(model)
    print(f"wrote {out} ({out.stat().st_size / 2 ** 20:.1f} MB) in {time.perf_counter() - start:.0f} s: inputs "
          f"images [B,3,H,W], padding_mask [B,H,W] with any B and H, W >= {side}")
    return check(out, model, args.detections)


def check(path, model, detections: bool) -> int:
    """onnxruntime against PyTorch at CHECK_SIZES: 0 when within TOLERANCE."""
    from ddetr_dist.engine.onnx_runtime import INSTALL_HINT, largest_difference

    try:
        found = largest_difference(path, model, CHECK_SIZES, detections)
    except ImportError:
        print(f"not checked with onnxruntime (not installed: {INSTALL_HINT})")
        return 0
    worst = max(found.values())
    listing = ", ".join(f"{size} {diff:.1e}" for size, diff in found.items())
    if worst > TOLERANCE:
        print(f"ddetr export: onnxruntime's outputs differ from PyTorch's by more than {TOLERANCE:g}: {listing}",
              file=sys.stderr)
        return 1
    print(f"checked with onnxruntime: largest difference from PyTorch {listing} (batches of 2, one padded)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddetr_dist.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
