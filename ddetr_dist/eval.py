"""COCO evaluation of a trained model on the val shards.

  ddetr eval --checkpoint PATH [--config FILE] [--out DIR] [section.key=value ...]

PATH: a released official checkpoint, our model_final.pth, a run directory (its newest
checkpoint) or one checkpoint folder; on disk or in object storage (s3://..., fetched
first). The config: --config, else the run's config.yaml, else configs/demo.yaml; the
model's shape comes from the checkpoint. One process, or Ray workers when ray.num_workers > 1
(each evaluates its share; rank 0 scores and sends the results back through Ray; the workers
read the checkpoint and the data, so on a cluster those must be on shared storage or in
object storage, as for training). Prints the AP table; writes detections.json (COCO results)
and metrics.json into --out on this machine (default: the run's eval/<name>/, in the store
for a run there, else ./eval-<checkpoint name>/).

examples:
  ddetr eval --checkpoint runs/demo-20261125-101500
  ddetr eval --checkpoint r50_deformable_detr-checkpoint.pth --config configs/base.yaml ray.num_workers=1
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from ddetr_dist.config import DEMO_CONFIG, ConfigError
from ddetr_dist.engine.run_dir import EvalDir, RunDir
from ddetr_dist.engine.run_store import RunStore
from ddetr_dist.models import CheckpointMismatchError
from ddetr_dist.storage import staged_uri


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="official .pth, model_final.pth, run or checkpoint dir")
    parser.add_argument("--config", default=None, help="YAML config (default: the run's, else the demo's)")
    parser.add_argument("--out", default=None, help="where detections.json and metrics.json go")
    parser.add_argument("overrides", nargs="*", default=[], help="section.key=value config overrides")


def default_out_dir(checkpoint: str, run_dir: Path | None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if run_dir is not None:
        return RunDir(run_dir).manual_eval(stamp).path
    return Path(f"eval-{Path(checkpoint).stem}-{stamp}")


def evaluate_here(cfg, model, criterion, postprocess, out_dir: Path):
    """One process: this machine's GPU, else its CPU."""
    from ddetr_dist.engine.evaluate import evaluate

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return evaluate(model.to(device), criterion, postprocess, cfg, device, out_dir)


def run(args: argparse.Namespace) -> int:
    from ddetr_dist.engine.inference import load_trained, resolve_weights

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_dir = resolve_weights(args.checkpoint)[1]
        out_dir = Path(args.out) if args.out else default_out_dir(args.checkpoint, run_dir)
        # loaded once: the model's shape (from the checkpoint) completes the config, and one
        # process evaluates this very model
        cfg, model, criterion, postprocess, weights = load_trained(args.checkpoint, args.config, args.overrides,
                                                                   DEMO_CONFIG)
        if not cfg.data.val_shards:
            raise ConfigError("config key 'data.val_shards' is empty: point it at the shards to evaluate on")
        if cfg.ray.worker_range()[1] > 1:  # a run's range of workers (docs/elastic.md): its most
            from ddetr_dist.on_ray.eval_workers import evaluate_on_ray

            del model  # the workers load their own
            result = evaluate_on_ray(cfg, weights, out_dir)  # the workers send back; the driver writes out_dir
        else:
            result = evaluate_here(cfg, model, criterion, postprocess, out_dir)
    except (ConfigError, CheckpointMismatchError, FileNotFoundError, ValueError) as e:
        print(f"ddetr eval: {e}", file=sys.stderr)
        return 2
    files = EvalDir(out_dir)
    shown = str(files.detections)
    if run_dir is not None and not args.out and staged_uri(run_dir):  # a run in object storage: results go there
        run = RunDir(run_dir, store_uri=staged_uri(run_dir))
        RunStore(run).push()
        shown = run.uri_of(files.detections)
    print(f"{staged_uri(weights) or weights}: {result.metrics['images']} images, {result.metrics['detections']} "
          f"detections\n{result.table()}\n-> {shown}, {files.metrics.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddetr_dist.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
