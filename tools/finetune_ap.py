"""Fine-tuning vs training from scratch, measured in one run (docs/finetuning.md).

  .venv/bin/python tools/finetune_ap.py                  # about 10 minutes on a 2-core CPU
  .venv/bin/python tools/finetune_ap.py --pretrain-steps 1200 --steps 600 --work /tmp/ft

1. demo data (`ddetr demo-data`'s shapes, its seed) and, from it, a dataset of its own: the
   circles, squares and triangles only, as categories 3, 17 and 42 ("disc", "box", "wedge"),
   written as COCO json and sharded as a user would;
2. the demo model (configs/demo.yaml) pretrained on the demo's 7 classes;
3. two runs on the new dataset for the same number of steps: one with
   model.init_checkpoint = the pretrained model (43 classes: its class heads re-initialised,
   everything else loaded; learning rates x --finetune-lr-scale, as configs/finetune.yaml
   lowers them), one from scratch (configs/demo.yaml's own rates);
4. both evaluated on the new dataset's val images: COCO AP and AP50.

The runs use the engine's Trainer in this process (one gloo rank, no Ray: as `ddetr bench
train`'s engine path), with all the CPU threads.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the checkout's package
    sys.path.insert(0, str(REPO))

from ddetr_dist.config import load_config  # noqa: E402
from ddetr_dist.data import demo  # noqa: E402
from ddetr_dist import cli  # noqa: E402

DEMO = REPO / "configs" / "demo.yaml"
SPARSE = {1: (3, "disc"), 2: (17, "box"), 3: (42, "wedge")}  # demo id -> (id, name) in the new dataset


def sparse_dataset(demo_dir: Path, out: Path) -> Path:
    """The demo's circles, squares and triangles as categories 3, 17, 42: COCO json, then
    `ddetr shard`, as a user would (tests/distributed/test_finetune.py makes its data here too)."""
    for split in ("train", "val"):
        coco = json.loads((demo_dir / split / "annotations.json").read_text())
        coco["categories"] = [{"id": i, "name": name, "supercategory": "shape"} for i, name in SPARSE.values()]
        coco["annotations"] = [{**a, "category_id": SPARSE[a["category_id"]][0]} for a in coco["annotations"]
                               if a["category_id"] in SPARSE]
        annotations = out / f"{split}.json"
        annotations.parent.mkdir(parents=True, exist_ok=True)
        annotations.write_text(json.dumps(coco))
        if cli.main(["shard", "--images", str(demo_dir / split / "images"), "--annotations", str(annotations),
                     "--out", str(out / split / "shards"), "--workers", "1", "--no-progress"]) != 0:
            raise RuntimeError(f"ddetr shard failed on {annotations}")
    return out


def train(name: str, work: Path, overrides: list[str]) -> tuple[dict, float]:
    """One run of configs/demo.yaml + `overrides` -> (its final evaluation, seconds)."""
    from ddetr_dist.engine.checkpointers import FolderCheckpointer
    from ddetr_dist.engine.loop import Trainer
    from ddetr_dist.engine.run_dir import RunDir

    cfg = load_config(DEMO, [f"name={name}", f"output_dir={work / 'runs'}", "train.pictures=0",
                             "train.eval_every_epochs=0", "train.log_every_steps=50", *overrides])
    run_dir = RunDir(work / "runs" / name)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    Trainer(cfg, run_dir, FolderCheckpointer(run_dir)).fit()
    seconds = time.perf_counter() - start
    summary = json.loads(run_dir.final_metrics.read_text())
    return summary.get("eval", {}), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=800, help="demo train images")
    parser.add_argument("--val", type=int, default=100, help="demo val images")
    parser.add_argument("--pretrain-steps", type=int, default=500)
    parser.add_argument("--steps", type=int, default=250, help="steps of each run on the new dataset")
    parser.add_argument("--finetune-lr-scale", type=float, default=0.25, help="the fine-tuning run's lr x this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="working directory (default: a new temporary one)")
    args = parser.parse_args(argv)

    from ddetr_dist.console import quiet_libraries
    from ddetr_dist.on_ray.bench import one_process_group

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the runs' step lines
    quiet_libraries()
    work = Path(args.work or tempfile.mkdtemp(prefix="ddetr-finetune-ap-"))
    print(f"finetune_ap: working in {work}")
    demo.generate(work / "demo", train=args.train, val=args.val, seed=args.seed, workers=2, progress=False)
    sparse = sparse_dataset(work / "demo", work / "sparse")
    lr = load_config(DEMO).optim
    new_data = [f"data.train_shards={sparse / 'train' / 'shards'}", f"data.val_shards={sparse / 'val' / 'shards'}",
                f"train.max_steps={args.steps}", f"seed={args.seed}"]
    with one_process_group():
        _, pretrain_s = train("pretrain", work, [f"data.train_shards={work / 'demo' / 'train' / 'shards'}",
                                                 "data.val_shards=", f"train.max_steps={args.pretrain_steps}"])
        scale = args.finetune_lr_scale
        finetuned, finetune_s = train("finetune", work, new_data + [
            f"model.init_checkpoint={work / 'runs' / 'pretrain' / 'model_final.pth'}",
            f"optim.lr={lr.lr * scale}", f"optim.lr_backbone={lr.lr_backbone * scale}"])
        scratch, scratch_s = train("scratch", work, new_data)
    print(f"\npretrained {args.pretrain_steps} steps on the demo's 7 classes ({pretrain_s:.0f} s); then "
          f"{args.steps} steps on {args.train} images of categories 3, 17, 42 (model.num_classes=auto: 43):")
    print(f"{'run':<40} {'AP':>6} {'AP50':>6} {'s':>6}")
    for name, result, seconds in ((f"from the checkpoint (lr x {scale:g})", finetuned, finetune_s),
                                  ("from scratch (configs/demo.yaml)", scratch, scratch_s)):
        print(f"{name:<40} {result.get('AP', float('nan')):6.3f} {result.get('AP50', float('nan')):6.3f} "
              f"{seconds:6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
