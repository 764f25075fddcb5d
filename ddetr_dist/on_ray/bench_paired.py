"""`ddetr bench train`'s (a) plain loop and (b) engine loops, step by step in turn. Run one
after the other, the same engine measured 0.84x to 1.08x the plain loop in four runs on the
2-core test machine: its drift over a minute is larger than the gaps to measure. So (b) runs
as `ddetr train` runs it in a worker (the Trainer's loop: loader, DeepSpeed engine, logging,
checkpoint policy), and beside each of its optimizer steps (a) takes one step on the same
batch, timed apart, before it and after it in turn. (b)'s time per step is its timed log window's wall time (the loop's own
work too, where the `--compile` path's (b), run alone, sums a record's phases) less (a)'s
steps in it; each (b) row carries the images/s of the (a) steps beside it, its ratio's
denominator."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from ddetr_dist.config import Config


def take_plain_steps_beside(trainer, plain_step: Callable, timed: list[dict]) -> None:
    """Before each of `trainer`'s optimizer steps, one `plain_step` (bench.PlainStep) on the
    same batch; its phases and `total` (seconds) appended to `timed`."""
    from ddetr_dist.on_ray.bench import PHASES

    engine_step = trainer._optimizer_step

    def both(window: list) -> None:
        if len(window) != 1:  # (a) takes one optimizer step per batch
            raise ValueError("ddetr bench train compares one batch per step: set train.grad_accum=1")
        # in turns of which goes first: the first step on a batch is 30-50 ms slower (of 0.3 s).
        # Nearly every demo batch has an image size not seen before, and the first step on a size
        # sets up oneDNN's kernels for it (a profile: about 20 ms more in convolution backward
        # and the matrix multiplies); it also takes the page faults of the fresh batch
        engine_first = len(timed) % 2 == 1
        if engine_first:
            engine_step(window)
        images, mask, targets = window[0]
        times = dict.fromkeys(PHASES, 0.0)
        start = time.perf_counter()
        plain_step(images, mask, targets, times, start)
        timed.append({**times, "total": time.perf_counter() - start})
        if not engine_first:
            engine_step(window)

    trainer._optimizer_step = both


def engine_trainer(cfg: Config, stage: int, steps: int, workdir: Path):
    """(b)'s Trainer (engine/loop.py) at ZeRO-`stage`: `steps` warm-up and `steps` timed, each
    logged once, in its own run directory under `workdir`."""
    from ddetr_dist.engine.checkpointers import FolderCheckpointer
    from ddetr_dist.engine.loop import Trainer
    from ddetr_dist.engine.run_dir import RunDir
    from ddetr_dist.on_ray.bench import timed_run

    cfg = timed_run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, zero_stage=stage)),
                    f"zero{stage}", steps)
    run_dir = RunDir(workdir / cfg.name)
    run_dir.path.mkdir(parents=True)
    return Trainer(cfg, run_dir, FolderCheckpointer(run_dir))


def paired_engine_loop(cfg: Config, stage: int, steps: int, workdir: Path):
    """(a) and (b) at ZeRO-`stage` in turn: -> (a)'s row, (b)'s row (bench.Measured)."""
    from ddetr_dist.engine.metrics import read_metrics
    from ddetr_dist.on_ray.bench import PHASES, Measured, measured_from, plain_step_of

    trainer = engine_trainer(cfg, stage, steps, workdir)
    timed: list[dict] = []
    take_plain_steps_beside(trainer, plain_step_of(cfg), timed)
    trainer.fit()
    run_dir = trainer.run_dir
    warmed_up, timed_window = [r for r in read_metrics(run_dir.path) if r.get("event") == "train"][-2:]
    b = measured_from(f"(b) DeepSpeed ZeRO-{stage}, 1 process", timed_window, steps)
    plain = timed[steps:]  # those in (b)'s timed log window
    plain_s = sum(t["total"] for t in plain) / len(plain)
    # (a) takes (b)'s batches: it is charged (b)'s wait for them, as it would wait for its own loader
    a = Measured("(a) plain PyTorch, 1 process", 0.0, plain_s + b.phases["data"],
                 {**{phase: sum(t[phase] for t in plain) / len(plain) for phase in PHASES}, "data": b.phases["data"]})
    # the window's wall time (its records' clocks: the loop's own work too, not only the
    # phases a record sums) less the (a) steps in it
    b.step_s = (timed_window["time"] - warmed_up["time"]) / steps - plain_s
    a.images_per_s, b.images_per_s = cfg.data.batch_size / a.step_s, cfg.data.batch_size / b.step_s
    b.beside = a.images_per_s
    return a, b


def paired_rows(cfg: Config, steps: int, workdir: Path) -> list:
    """(a), then (b) at ZeRO 0, 1 and 2, each measured beside its own (a) steps; the (a) row
    is their mean."""
    from ddetr_dist.on_ray.bench import PHASES, Measured

    pairs = [paired_engine_loop(cfg, stage, steps, workdir) for stage in (0, 1, 2)]
    plains = [a for a, _ in pairs]
    step_s = sum(a.step_s for a in plains) / len(plains)
    mean = Measured(plains[0].name, cfg.data.batch_size / step_s, step_s,
                    {phase: sum(a.phases[phase] for a in plains) / len(plains) for phase in PHASES})
    return [mean] + [b for _, b in pairs]
