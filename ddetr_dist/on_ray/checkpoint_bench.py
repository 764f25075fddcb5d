"""What a checkpoint costs the train loop: the stall per save (how long `save_checkpoint`
keeps the loop from its next step), with the files written by the loop itself
(`train.async_checkpoint=false`) and in the background (true, the default), both measured
in one run (this machine is noisy: compare within a run) and printed with their ratio.

  (a) the DeepSpeed engine loop in one process, for each ZeRO stage of `--stages`
  (b) with `--ray`: `ddetr train` itself, Ray with 2 workers on gloo (rank 0's stalls)

Each path trains `--saves` x `--every` steps and saves every `--every` steps (the last
save is the end of the run's), without evaluation. The stall of a background save is the
CPU copy of the state plus any wait for the save before it; the write itself goes on
while the loop trains. Target: async stall at most a fifth of the synchronous one.

`--model-config configs/base.yaml` takes the model of another config (its backbone
trained from scratch as the demo's: nothing to download) with this config's data, e.g.
the R50 base model on the demo data:

  ddetr bench checkpoint --model-config configs/base.yaml --every 1 data.batch_size=1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ddetr_dist.config import Config, load_config
from ddetr_dist.engine.init_weights import with_classes_of_data

MODES = {False: "sync", True: "async"}  # train.async_checkpoint -> the column


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"))
    parser.add_argument("--model-config", default=None, metavar="YAML",
                        help="take the model section from this config (e.g. configs/base.yaml), without its "
                             "backbone weights")
    parser.add_argument("--saves", type=int, default=3, help="checkpoints per path")
    parser.add_argument("--every", type=int, default=2, help="optimizer steps between checkpoints")
    parser.add_argument("--stages", default="0", help="ZeRO stages to measure, e.g. 0,1,2")
    parser.add_argument("--ray", action="store_true", help="also (b): Ray, 2 workers on gloo")
    parser.add_argument("--dir", default=None, help="where the runs write (default: a temporary folder)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the rows to PATH as JSON")
    parser.add_argument("overrides", nargs="*", default=[], help="section.key=value config overrides")


@dataclasses.dataclass
class Row:
    name: str
    stall_s: dict  # mode -> mean stall per save (s)
    worst_s: dict  # mode -> longest stall (s)
    wall_s: dict  # mode -> whole run, build to model_final.pth (s)
    checkpoint_mb: float

    @property
    def ratio(self) -> float:
        return self.stall_s["async"] / self.stall_s["sync"] if self.stall_s["sync"] else float("nan")


def bench_config(cfg: Config, name: str, args: argparse.Namespace, background: bool, **ray) -> Config:
    return dataclasses.replace(
        cfg, name=name, ray=dataclasses.replace(cfg.ray, **ray), data=dataclasses.replace(cfg.data, val_shards=""),
        train=dataclasses.replace(cfg.train, max_steps=args.saves * args.every, checkpoint_every_steps=args.every,
                                  log_every_steps=args.every, eval_every_epochs=0, async_checkpoint=background))


def stalls(run_dir: Path) -> list[float]:
    from ddetr_dist.engine.metrics import read_metrics

    return [r["stall_s"] for r in read_metrics(run_dir) if r.get("event") == "checkpoint"]


def checkpoint_mb(run_dir: Path) -> float:
    sizes = [p.stat().st_size for p in run_dir.rglob("portable.pt")]
    return max(sizes) / 2 ** 20 if sizes else 0.0


def one_process(cfg: Config, args: argparse.Namespace, stage: int, workdir: Path, background: bool) -> tuple:
    """(a) one path: the engine loop in this process, checkpoints in the run directory."""
    from ddetr_dist.engine.checkpointers import FolderCheckpointer
    from ddetr_dist.engine.loop import Trainer
    from ddetr_dist.engine.run_dir import RunDir

    cfg = bench_config(cfg, f"zero{stage}-{MODES[background]}", args, background)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, zero_stage=stage))
    run_dir = RunDir(workdir / cfg.name)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    Trainer(cfg, run_dir, FolderCheckpointer(run_dir)).fit()
    return stalls(run_dir.path), time.perf_counter() - start, checkpoint_mb(run_dir.path)


def on_ray(cfg: Config, args: argparse.Namespace, stage: int, workdir: Path, background: bool) -> tuple:
    """(b) one path: `ddetr train` on a local Ray, 2 workers."""
    from ddetr_dist.on_ray.driver import train

    cfg = bench_config(cfg, f"ray-zero{stage}-{MODES[background]}", args, background, num_workers=2,
                       cpus_per_worker=1, address="")
    cfg = dataclasses.replace(cfg, output_dir=str(workdir), train=dataclasses.replace(cfg.train, zero_stage=stage))
    start = time.perf_counter()
    result = train(cfg)
    return stalls(result.run_dir), time.perf_counter() - start, checkpoint_mb(workdir / cfg.name)


def measure(name: str, path, *args) -> Row:
    row = Row(name, {}, {}, {}, 0.0)
    for background in (False, True):
        measured, wall, size = path(*args, background)
        mode = MODES[background]
        row.stall_s[mode], row.worst_s[mode], row.wall_s[mode] = statistics.mean(measured), max(measured), wall
        row.checkpoint_mb = max(row.checkpoint_mb, size)
    return row


def print_table(rows: list[Row]) -> None:
    print(f"\n{'path':<34} {'portable.pt':>11} {'sync stall':>10} {'async stall':>11} {'async/sync':>10} "
          f"{'worst sync':>10} {'worst async':>11} {'run sync':>8} {'run async':>9}")
    for r in rows:
        print(f"{r.name:<34} {r.checkpoint_mb:9.1f}MB {r.stall_s['sync']:9.3f}s {r.stall_s['async']:10.3f}s "
              f"{r.ratio:10.3f} {r.worst_s['sync']:9.3f}s {r.worst_s['async']:10.3f}s "
              f"{r.wall_s['sync']:7.1f}s {r.wall_s['async']:8.1f}s")
    worst = max(r.ratio for r in rows)
    print(f"\nstall per save: the mean over the saves of a run; target async <= 0.20 x sync: "
          f"{'met' if worst <= 0.20 else 'NOT met'} (worst {worst:.3f})")


def model_of(cfg: Config, model_config: str | None) -> Config:
    """`cfg` with the model section of `model_config`, its backbone from scratch as the demo's
    (no weights to download; `ddetr train` refuses a random backbone with frozen BatchNorm)."""
    if not model_config:
        return cfg
    model = dataclasses.replace(load_config(model_config, []).model, backbone_weights="", backbone_norm="bn",
                                backbone_frozen_stages=0, num_classes=cfg.model.num_classes)
    return dataclasses.replace(cfg, model=model)


def run(args: argparse.Namespace) -> int:
    from ddetr_dist.on_ray.bench import one_process_group

    cfg = with_classes_of_data(model_of(load_config(args.config, args.overrides), args.model_config))
    stages = [int(s) for s in args.stages.split(",")]
    threads = cfg.ray.worker_range()[1] * cfg.ray.cpus_per_worker  # a range of workers: its most
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the one-process paths get the cores the Ray workers share
    print(f"bench checkpoint: {args.config}" + (f" with the model of {args.model_config}" if args.model_config else "")
          + f", {args.saves} saves every {args.every} steps per path, batch {cfg.data.batch_size}, {threads} threads")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ddetr-bench-checkpoint-", dir=args.dir) as tmp:
        with one_process_group():  # one for all: DeepSpeed keeps the groups it saw first
            # a first run pays for imports and DeepSpeed's op builds: not the first path measured
            one_process(cfg, argparse.Namespace(saves=1, every=1), stages[0], Path(tmp) / "warm-up", True)
            for stage in stages:
                rows.append(measure(f"(a) ZeRO-{stage}, 1 process", one_process, cfg, args, stage, Path(tmp)))
        torch.set_num_threads(previous_threads)
        if args.ray:
            for stage in stages:
                rows.append(measure(f"(b) ZeRO-{stage}, Ray 2 workers (gloo)", on_ray, cfg, args, stage, Path(tmp)))
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "model_config": args.model_config, "overrides": args.overrides,
                       "saves": args.saves, "every": args.every,
                       "rows": [{**dataclasses.asdict(r), "ratio": r.ratio} for r in rows]}, f, indent=1)
    return 0
