"""Train Deformable DETR: Ray Train workers, each running a DeepSpeed ZeRO engine.

  ddetr train [--config FILE] [section.key=value ...]
  python -m ddetr_dist.train [--config FILE] [section.key=value ...]

Without --config it trains configs/demo.yaml on the built-in demo dataset (generated into
data/demo first if missing). The run directory is <output_dir>/<name>/: config.yaml,
deepspeed_config.json, metrics.jsonl, Ray's checkpoints and, at the end, model_final.pth
(official parameter names). The same name resumes from its newest checkpoint (also a
finished run given a larger train.max_steps or optim.epochs); a new name starts fresh.
output_dir may be object storage (s3://bucket/prefix, gs://..., credentials on every node:
docs/object-storage.md); nothing then needs a shared file system.

config sections (every key: ddetr_dist/config.py; files: configs/):
  model  the detector (backbone_depth, hidden_dim, layers, queries, with_box_refine, two_stage,
         num_classes: auto = from the train data, init_checkpoint: fine-tune a trained detector)
  loss   matcher costs and loss weights
  data   shards (train_shards, val_shards), batch_size per worker, loader num_workers, scales
  optim  lr, lr_backbone, lr_linear_proj_mult, weight_decay, epochs, lr_drop, clip_max_norm, warmup_steps
  train  max_steps, precision (fp32/bf16/fp16; fp16 with zero_stage 0 only), zero_stage (0-3),
         grad_accum, loss_scale_power/loss_scale_window (fp16), checkpoint_every_steps,
         log_every_steps, max_bad_steps
  ray    address, num_workers (a number, or a range 2-4: elastic), use_gpu, cpus_per_worker,
         max_failures, keep_checkpoints, resize_check_s

examples:
  ddetr train                                              # the demo, 2 workers on this machine
  ddetr train --config configs/base.yaml name=r50 ray.num_workers=8 train.precision=bf16
  ddetr train --config configs/demo.yaml train.zero_stage=2 train.max_steps=200
  ddetr train --config configs/base.yaml name=r50 output_dir=s3://my-bucket/runs   # object storage
  ddetr train --config configs/finetune.yaml model.init_checkpoint=r50_deformable_detr-checkpoint.pth  # docs/finetuning.md
  RAY_ADDRESS=ray://head:10001 ddetr train --config configs/box_refine.yaml   # an existing cluster
  ray job submit --working-dir . -- ddetr train --config configs/base.yaml    # as a Ray job
"""
from __future__ import annotations

import argparse
import logging
import sys

from ddetr_dist.config import DEMO_CONFIG, REPO, ConfigError, load_config
from ddetr_dist.engine.run_dir import RunDir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help=f"YAML config (default: the demo, {DEMO_CONFIG.relative_to(REPO)})")
    parser.add_argument("--print-run-dir", action="store_true",
                        help="print the run directory this config and these overrides train into, and exit "
                             "(scripts use it: e.g. to create <run dir>/CHECKPOINT_NOW, which makes the run "
                             "save a checkpoint at its next step)")
    parser.add_argument("overrides", nargs="*", default=[], help="section.key=value config overrides")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ddetr_dist.on_ray.driver import TrainingFailed, train
    from ddetr_dist.on_ray.preemption import TrainingStopped

    try:
        cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
        if args.print_run_dir:
            print(RunDir.of(cfg).where)
            return 0
        if args.config is None:
            from ddetr_dist.data.demo import ensure_demo_data

            ensure_demo_data(cfg.data.train_shards)
        result = train(cfg)
    except ConfigError as e:
        print(f"ddetr train: {e}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        print(f"ddetr train: {e}", file=sys.stderr)
        return 1
    except TrainingStopped as e:  # SIGTERM, after saving: what a shell reports for SIGTERM
        print(f"ddetr train: {e}", file=sys.stderr)
        return 143
    print(summary(result))
    return 0


def summary(result) -> str:
    """What the run left: the last losses, the last AP table, where to look."""
    import json

    from ddetr_dist.engine.evaluate import EvalResult

    m, run_dir = result.metrics, RunDir(result.run_dir)
    lines = [f"done: {run_dir.where}"]
    if m:
        lines.append(f"  last step {m['step']}: loss {m['loss']:.4f}, {m['images_per_s']:.1f} images/s")
    evals = run_dir.step_evaluations()  # the train loop's, not `ddetr eval`'s
    if evals:
        step = max(evals)
        saved = json.loads(evals[step].metrics.read_text())
        lines += [f"  evaluation at step {step} ({saved['metrics']['images']} val images):",
                  EvalResult(saved["metrics"], saved["per_category_AP"]).table(),
                  f"  predictions drawn: {run_dir.uri_of(evals[step].predictions)}"]
    lines += [f"  model: {result.model_final}", f"  metrics: {run_dir.uri_of(run_dir.metrics)}",
              f"  TensorBoard: tensorboard --logdir {run_dir.uri_of(run_dir.tensorboard)}"]
    threshold = detection_threshold(evals[max(evals)].detections) if evals else None
    lines += ["  its detections, drawn into predictions/ (any images of your own, too):",
              "    " + predict_command(run_dir, result.model_final, threshold)]
    return "\n".join(lines)


def detection_threshold(detections_path) -> float | None:
    """A --threshold that shows this model's detections: at most predict's default 0.5, and
    low enough that 4 in 5 val images keep their best-scoring detection (a model early in
    training scores its right answers 0.3-0.4, under which 0.5 shows nothing)."""
    import json

    try:
        detections = json.loads(detections_path.read_text())
    except (OSError, ValueError):
        return None
    best: dict = {}
    for d in detections:
        best[d["image_id"]] = max(best.get(d["image_id"], 0.0), d["score"])
    if not best:
        return None
    scores = sorted(best.values())
    fifth = scores[len(scores) // 5]
    return min(0.5, max(0.05, int(fifth * 20) / 20))  # down to a multiple of 0.05


def predict_command(run_dir: RunDir, model_final, threshold: float | None) -> str:
    """`ddetr predict` on the run's val images where they lie next to its shards (the demo
    data's do), else on a placeholder IMAGES/."""
    from pathlib import Path

    images = "IMAGES/"
    try:
        shards = Path(load_config(run_dir.config).data.val_shards)
        if (shards.parent / "images").is_dir():
            images = f"{shards.parent / 'images'}/"
    except (OSError, ConfigError):
        pass
    option = f" --threshold {threshold:g}" if threshold is not None and threshold < 0.5 else ""
    return f"ddetr predict {images} --checkpoint {model_final}{option} --out predictions"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddetr_dist.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
