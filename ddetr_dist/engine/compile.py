"""`train.compile`: the model compiled with torch.compile (inductor) inside the DeepSpeed
engine, forward and backward, on every rank; where the compiled code is cached; how many
times it compiled.

DeepSpeed's `engine.compile()` compiles the module in place (`nn.Module.compile`): the
engine calls it under its autocast as before, its state dict keeps its names (checkpoints
do not change), and DeepSpeed's gradient hooks (ZeRO-1/2) still run after each parameter's
gradient, outside the compiled backward. ZeRO-3 is refused (config.check_compile).

Shapes are static (`dynamic=False`): the detector reads its feature maps' sizes as Python
numbers (position encodings, the levels of the attention op), so a "dynamic" graph is
specialised to them anyway and every new image size compiled again (6 sizes, 6 compilations,
measured). Training batches are padded to multiples of data.pad_to_multiple instead
(config.pad_multiple): one compilation per shape bucket, at most
ceil(max_size / multiple) ** 2 of them (`compile_bound`), the recompile limit dynamo is given.
Evaluation runs eagerly (eval_hook.py): its sizes differ from training's and it runs a few
hundred images, not enough to repay a compilation.

The inductor cache (FX graphs and AOT-autograd graphs) lives in a node-local directory,
$TORCHINDUCTOR_CACHE_DIR or ~/.cache/ddetr_dist/inductor (beside the op's build), so that a
restart or a resume on the same node loads the compiled code instead of compiling again.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch

from ddetr_dist.config import Config, check_compile, pad_multiple

log = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def inductor_cache_dir() -> Path:
    """$TORCHINDUCTOR_CACHE_DIR, else $XDG_CACHE_HOME (or ~/.cache)/ddetr_dist/inductor."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddetr_dist" / "inductor"


def use_inductor_cache() -> Path:
    """Point inductor's on-disk caches at inductor_cache_dir() (read at each compilation),
    FX graph cache and AOT-autograd cache on; -> the directory."""
    path = inductor_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.environ[CACHE_ENV] = str(path)
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return path


def compile_bound(cfg: Config) -> int:
    """The most compilations a training run can need: one per (height, width) bucket, a
    batch's sides being at most data.max_size, padded up to multiples of the padding."""
    multiple = pad_multiple(cfg)
    if multiple <= 1:
        return 0  # unbounded: every random size is a new shape
    return math.ceil(cfg.data.max_size / multiple) ** 2


def compilations() -> int:
    """Graphs dynamo compiled in this process so far (each with its backward)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


class CompileWatch:
    """Counts compilations after each optimizer step: a `compile` record (metrics.jsonl and a
    console line) when a step compiled, a `compiles` record with the epoch's count at its end.
    Disabled (train.compile off): does nothing."""

    def __init__(self, metrics, enabled: bool, batches_per_epoch: int = 1, bound: int = 0):
        self.metrics, self.enabled, self.batches_per_epoch, self.bound = metrics, enabled, batches_per_epoch, bound
        self.seen = self.at_epoch_start = compilations()
        self.tick = time.perf_counter()

    def after_step(self, progress, window: list) -> None:
        """After optimizer step `progress.step` over the micro-batches `window` (before the
        loop counts them into the epoch)."""
        if not self.enabled:
            return
        now, count = time.perf_counter(), compilations()
        if count > self.seen:
            height, width = window[-1][0].shape[-2:]
            self.metrics.emit({"event": "compile", "step": progress.step, "epoch": progress.epoch,
                               "shape": [int(height), int(width)], "new": count - self.seen, "compiles": count,
                               "bound": self.bound, "step_s": round(now - self.tick, 2)})
        self.seen, self.tick = count, now
        if progress.batches_in_epoch + len(window) >= self.batches_per_epoch:
            self.metrics.emit({"event": "compiles", "epoch": progress.epoch, "step": progress.step,
                               "in_epoch": count - self.at_epoch_start, "compiles": count, "bound": self.bound})
            self.at_epoch_start = count
            self.tick = time.perf_counter()  # the epoch's end (evaluation, checkpoint) is no step


def compile_engine(engine, cfg: Config, metrics, batches_per_epoch: int) -> CompileWatch:
    """With train.compile: compile `engine`'s model (inductor, static shapes), its cache in
    the node-local directory. -> the watch that counts its compilations."""
    if not cfg.train.compile:
        return CompileWatch(metrics, enabled=False)
    check_compile(cfg)  # also where the driver checks: a run without it (bench, tests) fails the same way
    cache, bound = use_inductor_cache(), compile_bound(cfg)
    # past the limit dynamo would run new shapes eagerly, silently: the bound is the limit
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, bound + 1)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           bound + 1)
    engine.compile(backend="inductor", compile_kwargs={"dynamic": False})
    log.info("train.compile: inductor, batches padded to multiples of %d (at most %s compilations), cache in %s",
             pad_multiple(cfg), bound or "unbounded", cache)
    return CompileWatch(metrics, enabled=True, batches_per_epoch=batches_per_epoch, bound=bound)
