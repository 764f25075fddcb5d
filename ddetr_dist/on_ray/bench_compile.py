"""`ddetr bench train --compile`: eager against compiled (train.compile, engine/compile.py)
in one run, and what compiling cost.

  --synthetic HxW  (a) plain PyTorch eagerly, then the same with the model compiled; the
                   compile time is the compiled warm-up's wall time less the eager one's
  otherwise        (a) plain PyTorch, then (b) the DeepSpeed ZeRO-0 engine loop eagerly and
                   with train.compile=true on the config's train data (padded to
                   data.pad_to_multiple): its compile records give the compile time and count
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from ddetr_dist.config import Config, pad_multiple
from ddetr_dist.engine.compile import use_inductor_cache


def compile_model(model: torch.nn.Module) -> None:
    """In place, as train.compile does it (engine/compile.py), with its cache."""
    use_inductor_cache()
    model.compile(backend="inductor", dynamic=False)


def compile_summary(eager, compiled, compile_s: float | None = None, **extra) -> dict:
    """Print and return compiled/eager images/s and the compile time (default: the
    difference of the two paths' warm-up wall times)."""
    if compile_s is None:
        compile_s = compiled.warmup_s - eager.warmup_s
    speedup = compiled.images_per_s / eager.images_per_s
    more = "".join(f", {key.replace('_', ' ')} {value}" for key, value in extra.items())
    print(f"\ncompiled vs eager: {compiled.images_per_s:.2f} vs {eager.images_per_s:.2f} images/s = {speedup:.2f}x; "
          f"compile time {compile_s:.0f} s{more}")
    return {"compile_s": round(compile_s, 1), "compiled_speedup": round(speedup, 3), **extra}


def compile_records(run_dir: Path, timed_after: int) -> tuple[float, int, list[dict]]:
    """(seconds of the steps that compiled, compilations in all, the records of those in the
    timed steps)."""
    from ddetr_dist.engine.metrics import read_metrics

    records = [r for r in read_metrics(run_dir) if r.get("event") == "compile"]
    return (sum(r["step_s"] for r in records), sum(r["new"] for r in records),
            [r for r in records if r["step"] > timed_after])


def without_compiling_steps(row, timed: list[dict], steps: int, batch_size: int):
    """`row` (a timed window of `steps`) less its steps that compiled: the compiled speed."""
    if timed and len(timed) < steps:
        wall = row.step_s * steps - sum(r["step_s"] for r in timed)
        row.images_per_s = batch_size * (steps - len(timed)) / wall
        row.step_s = wall / (steps - len(timed))
        row.name += f" ({len(timed)} compiling steps left out)"
    return row


def compiled_engine_rows(cfg: Config, args: argparse.Namespace, rows: list, workdir: Path) -> int:
    """After (a) in `rows`: the ZeRO-0 engine loop eagerly and compiled; prints the table."""
    from ddetr_dist.on_ray.bench import engine_loop, print_table, write_json

    eager = engine_loop(cfg, 0, args.steps, workdir / "eager")
    compiled_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=True))
    compiled = engine_loop(compiled_cfg, 0, args.steps, workdir / "compiled")
    compiled.name = "(b) DeepSpeed ZeRO-0, compiled"
    compile_s, compiles, timed = compile_records(workdir / "compiled" / "zero0", args.steps)
    rows += [eager, without_compiling_steps(compiled, timed, args.steps, cfg.data.batch_size)]
    print_table(rows)
    print(f"batches padded to multiples of {pad_multiple(compiled_cfg)} when compiled; the compile time is the "
          f"sum of the steps that compiled")
    extra = compile_summary(eager, compiled, compile_s, compilations=compiles, in_timed_steps=len(timed))
    if args.json:
        write_json(args.json, args, cfg, rows, **extra)
    return 0
