"""Training throughput of the demo model on the demo data, every path measured in one run
(this machine is noisy: compare within a run) and printed as ratios to the plain loop:

  (a) plain PyTorch in one process: loader -> model -> losses -> backward -> clip -> AdamW
  (b) our DeepSpeed engine loop in one process, ZeRO 0, 1 and 2 (one process runs ZeRO-1/2's
      engine as ZeRO-0, as `ddetr train` does with one worker: deepspeed_config.engine_stage)
  (c) the full `ddetr train` path: Ray, 2 workers (DeepSpeed ZeRO-0, gloo all-reduce)

Each path runs `--steps` optimizer steps of warm-up, then `--steps` timed ones; the one-process
paths use every core the Ray workers share. (a) and (b) take their steps in turn
(on_ray/bench_paired.py): a (b) row's ratio is to the (a) steps beside it. Targets: the engine
at least 0.98x the plain loop's images/s with ZeRO-0, 0.95x with ZeRO-1/2.

With `--synthetic HxW` only (a) runs, on the GPU when there is one, on random HxW images
with random boxes (no shards, no decoding: the model's speed and memory alone), under
`train.precision`'s autocast; it also prints the peak GPU memory. `make gpu-check` runs
  ddetr bench train --config configs/base.yaml --steps 15 --synthetic 800x1333 --compile train.precision=bf16 ...
`--compile` compares eager with compiled training (train.compile) in the same run and prints the
compile time (on_ray/bench_compile.py).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

from ddetr_dist.config import AUTO, COCO_NUM_CLASSES, Config, load_config, with_num_classes
from ddetr_dist.engine.evaluate import outputs_to_float
from ddetr_dist.engine.init_weights import with_classes_of_data
from ddetr_dist.on_ray.bench_compile import compile_model, compile_summary, compiled_engine_rows
from ddetr_dist.on_ray.bench_paired import engine_trainer, paired_rows
from ddetr_dist.on_ray.synthetic import synthetic_batches

ZERO0_TARGET, ZERO_TARGET = 0.98, 0.95  # (b) / (a): ZeRO-0, ZeRO-1/2
PHASES = ("data", "forward", "backward", "allreduce", "optimizer")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision -> autocast dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per path (as many warm up first)")
    parser.add_argument("--no-ray", action="store_true", help="skip (c), the Ray path")
    parser.add_argument("--synthetic", metavar="HxW", type=image_size, default=None,
                        help="only (a), on random HxW images (e.g. 800x1333; no shards needed), on the GPU "
                             "when there is one; also prints the peak GPU memory")
    parser.add_argument("--compile", action="store_true", help="eager vs train.compile, and the compile time")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the measured rows to PATH as JSON (make gpu-check reads it)")
    parser.add_argument("overrides", nargs="*", default=[], help="section.key=value config overrides")


@dataclasses.dataclass
class Measured:
    name: str
    images_per_s: float
    step_s: float
    phases: dict  # phase -> seconds per step
    peak_gpu_memory_gb: float | None = None  # torch's max_memory_allocated over the whole path (GiB)
    warmup_s: float | None = None  # the warm-up steps' wall time (a compiled path's: with its compilations)
    beside: float | None = None  # images/s of the (a) steps run in turn with this path's (bench_paired.py)


def image_size(text: str) -> tuple[int, int]:
    """'800x1333' -> (800, 1333): height x width."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 800x1333, got {text!r}") from None
    if height < 32 or width < 32:  # the backbone downsamples 32x
        raise argparse.ArgumentTypeError(f"images must be at least 32x32, got {text!r}")
    return height, width


class PlainStep:
    """One optimizer step of the plain loop, each phase timed into `times`."""

    def __init__(self, cfg: Config, model, criterion, optimizer, device: torch.device):
        self.model, self.criterion, self.optimizer, self.device = model, criterion, optimizer, device
        self.autocast_dtype = AUTOCAST.get(cfg.train.precision)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
        self.clip_max_norm = cfg.optim.clip_max_norm

    def now(self) -> float:  # CUDA runs asynchronously: wait for the GPU before reading the clock
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __call__(self, batch, mask, targets, times: dict, tick: float) -> None:
        """`tick`: when the wait for this batch began."""
        device, scaler = self.device, self.scaler
        batch, mask = batch.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        targets = [{k: v.to(device) for k, v in target.items()} for target in targets]
        t0 = self.now()
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            outputs = self.model(batch, mask)
        losses = self.criterion(outputs_to_float(outputs), targets)
        loss = sum(losses[k] * w for k, w in self.criterion.weight_dict.items() if k in losses)
        t1 = self.now()
        self.optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler else loss).backward()
        t2 = self.now()
        if scaler:
            scaler.unscale_(self.optimizer)  # clip the true gradients
        if self.clip_max_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_max_norm)
        if scaler:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        t3 = self.now()
        for phase, dt in zip(("data", "forward", "backward", "optimizer"), (t0 - tick, t1 - t0, t2 - t1, t3 - t2)):
            times[phase] += dt


def plain_step_of(cfg: Config, device: torch.device = torch.device("cpu"), compile: bool = False) -> PlainStep:
    """(a)'s model (seeded as the engine's), losses and AdamW, in train mode."""
    from ddetr_dist.engine.optim import build_optimizer
    from ddetr_dist.models import build_model

    torch.manual_seed(cfg.seed)
    model, criterion, _ = build_model(cfg)
    model.to(device).train()
    if compile:
        compile_model(model)
    return PlainStep(cfg, model, criterion, build_optimizer(model, cfg.optim, cfg.model), device)


def plain_loop(cfg: Config, steps: int, batches=None, device: torch.device = torch.device("cpu"),
               compile: bool = False) -> Measured:
    """(a): what a user would write without DeepSpeed or Ray: `train.precision`'s autocast
    around the forward (losses in fp32, as the engine computes them), a GradScaler for fp16.
    `batches`: an iterator of (images, padding_mask, targets); default the train loader."""
    from ddetr_dist.data import build_train_loader

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    plain_step = plain_step_of(cfg, device, compile)
    if batches is None:
        batches = build_train_loader(dataclasses.replace(cfg.data, samples_per_epoch=10 ** 6), seed=cfg.seed,
                                     rank=0, world_size=1, pin_memory=cuda)
    now = plain_step.now
    times = dict.fromkeys(PHASES, 0.0)
    images, start, tick = 0, 0.0, now()
    began = tick
    for step, (batch, mask, targets) in enumerate(batches):
        if step == steps:  # the warm-up's end
            times, images, start = dict.fromkeys(PHASES, 0.0), 0, now()
            tick = start
        plain_step(batch, mask, targets, times, tick)
        images += len(targets)
        tick = now()
        if step + 1 == 2 * steps:
            break
    wall = now() - start
    return Measured("(a) plain PyTorch, 1 process", images / wall, wall / steps,
                    {k: v / steps for k, v in times.items()},
                    torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None, start - began)


@contextlib.contextmanager
def one_process_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def last_window(run_dir: Path) -> dict:
    from ddetr_dist.engine.metrics import read_metrics

    return [r for r in read_metrics(run_dir) if r.get("event") == "train"][-1]


def measured_from(name: str, record: dict, steps: int) -> Measured:
    """From the last log window of a run logged every `steps` steps (rank 0's times)."""
    return Measured(name, record["images_per_s"], record["step_time"],
                    {"data": record["data_wait"] * record["step_time"],
                     **{phase: record[f"time_{phase}"] / steps for phase in ("forward", "backward", "allreduce", "optimizer")}})


def timed_run(cfg: Config, name: str, steps: int, **ray) -> Config:
    """`steps` of warm-up then `steps` timed, logged once each; no checkpoint in between, no
    evaluation."""
    return dataclasses.replace(
        cfg, name=name, ray=dataclasses.replace(cfg.ray, **ray), data=dataclasses.replace(cfg.data, val_shards=""),
        train=dataclasses.replace(cfg.train, max_steps=2 * steps, log_every_steps=steps, checkpoint_every_steps=0))


def engine_loop(cfg: Config, stage: int, steps: int, workdir: Path) -> Measured:
    """(b) alone: the DeepSpeed engine loop of `ddetr train`, without Ray, in this process."""
    trainer = engine_trainer(cfg, stage, steps, workdir)
    trainer.fit()
    return measured_from(f"(b) DeepSpeed ZeRO-{stage}, 1 process", last_window(trainer.run_dir.path), steps)


def ray_path(cfg: Config, steps: int, workdir: Path) -> Measured:
    """(c): `ddetr train` itself: a local Ray, 2 workers."""
    from ddetr_dist.on_ray.driver import train

    workers = 2
    cfg = dataclasses.replace(timed_run(cfg, "ray", steps, num_workers=workers, cpus_per_worker=1, address=""),
                              output_dir=str(workdir))
    result = train(cfg)
    return measured_from(f"(c) ddetr train: Ray, {workers} workers", last_window(result.run_dir), steps)


def print_table(rows: list[Measured]) -> None:
    base = rows[0]
    print(f"\n{'path':<36} {'images/s':>9} {'x (a)':>6} {'s/step':>7}   " + "  ".join(f"{p:>9}" for p in PHASES))
    def ratio(r: Measured) -> float:  # to the (a) steps beside it (bench_paired.py), else to (a)'s row
        return r.images_per_s / (r.beside or base.images_per_s)

    for r in rows:
        print(f"{r.name:<36} {r.images_per_s:9.2f} {ratio(r):6.2f} {r.step_s:7.3f}   "
              + "  ".join(f"{r.phases.get(p, 0.0):9.3f}" for p in PHASES))
    engines = [r for r in rows if r.name.startswith("(b)")]
    if engines:
        print()
    for r in engines:  # the targets: ZeRO-0 at least 0.98 x (a), every other stage 0.95
        target = ZERO0_TARGET if "ZeRO-0" in r.name else ZERO_TARGET
        beside = f" (the (a) steps beside it: {r.beside:.2f} images/s)" if r.beside else ""
        print(f"{r.name}: {ratio(r):.2f} x (a){beside}, target {target:.2f}: "
              f"{'met' if ratio(r) >= target else 'NOT met'}")
    print("phases: seconds per optimizer step of one worker (rank 0); allreduce is DeepSpeed's gradient "
          "reduction at the step boundary, a part of backward")
    for r in rows:
        if r.peak_gpu_memory_gb is not None:
            print(f"peak GPU memory of {r.name}: {r.peak_gpu_memory_gb:.2f} GiB (torch.cuda.max_memory_allocated)")


def write_json(path: str, args: argparse.Namespace, cfg: Config, rows: list[Measured], **extra) -> None:
    with open(path, "w") as f:
        json.dump({"config": args.config, "overrides": args.overrides, "steps": args.steps,
                   "batch_size": cfg.data.batch_size, "precision": cfg.train.precision, **extra,
                   "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)


def run_synthetic(cfg: Config, args: argparse.Namespace) -> int:
    """`--synthetic HxW`: (a) alone, on the GPU when there is one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    height, width = args.synthetic
    print(f"bench train: {args.config}, synthetic {height}x{width} images, batch {cfg.data.batch_size}, "
          f"{cfg.train.precision}, {where}; {args.steps} warm-up + {args.steps} timed steps")
    rows = [plain_loop(cfg, args.steps, synthetic_batches(cfg, args.synthetic, device), device, compile=c)
            for c in ((False, True) if args.compile else (False,))]
    for row, kind in zip(rows, ("", ", compiled")):
        row.name = f"(a) plain PyTorch, {device.type}, {height}x{width}{kind}"
    print_table(rows)
    extra = compile_summary(rows[0], rows[1]) if args.compile else {}
    if args.json:
        write_json(args.json, args, cfg, rows, synthetic=[height, width], device=where, **extra)
    return 0


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.synthetic:  # random labels: COCO's number of classes unless the config gives one
        return run_synthetic(with_num_classes(cfg, COCO_NUM_CLASSES) if cfg.model.num_classes == AUTO else cfg, args)
    cfg = with_classes_of_data(cfg)  # what `ddetr train` would resolve
    threads = cfg.ray.worker_range()[1] * cfg.ray.cpus_per_worker  # a range: its most
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the one-process paths get the cores the Ray workers share
    print(f"bench train: {args.config}, batch {cfg.data.batch_size}/process, {args.steps} warm-up + {args.steps} "
          f"timed steps per path, {threads} threads per one-process path")
    with tempfile.TemporaryDirectory(prefix="ddetr-bench-train-") as tmp:
        with one_process_group():  # one for all: DeepSpeed keeps the groups it saw first
            if args.compile:  # eager vs compiled ZeRO-0 engine loops only (compiling takes minutes)
                return compiled_engine_rows(cfg, args, [plain_loop(cfg, args.steps)], Path(tmp))
            rows = paired_rows(cfg, args.steps, Path(tmp))
        torch.set_num_threads(previous_threads)
        if not args.no_ray:
            rows.append(ray_path(cfg, args.steps, Path(tmp)))
    print_table(rows)
    if args.json:
        write_json(args.json, args, cfg, rows)
    return 0
