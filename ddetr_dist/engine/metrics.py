"""The one place a run's metrics go out: the run directory's `metrics.jsonl` (one JSON
object per logged step or evaluation) and the console, on rank 0. TensorBoard attaches
here as a sink."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch

from ddetr_dist.atomic import atomic_write_bytes
from ddetr_dist.engine.run_dir import RunDir
from ddetr_dist.engine.world_size import world_size_line

log = logging.getLogger("ddetr_dist.train")

Sink = Callable[[dict], None]


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsLog:
    """Rank 0 writes, the other ranks only count. Each record gets `time` (seconds since
    the epoch) and must carry `step` and `epoch`."""

    def __init__(self, path: Path, enabled: bool):
        self.path = Path(path)  # the run directory's metrics.jsonl
        self.enabled = enabled
        self.sinks: list[Sink] = []

    def truncate_after(self, step: int) -> None:
        """On resume: drop the lines of steps after the checkpoint (they are redone), so
        that the file reads as one uninterrupted run."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_bytes(self.path, "".join(line + "\n" for line in kept).encode())

    def emit(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **{k: _plain(v) for k, v in record.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink(record)
        line = console_line(record)
        if line:
            log.info("%s", line)


def duration(seconds: float) -> str:
    """12 s, 4 min 05 s, 2 h 07 min."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def console_line(record: dict) -> str | None:
    """The line a person reads for a record (the record itself goes to metrics.jsonl), or
    None: evaluations print their table, skipped steps and the final model their own lines."""
    event = record.get("event")
    if event == "train":
        eta = ""
        if "eta_s" in record:  # the epoch's part only while the epoch has steps left
            epoch_left = f"epoch {duration(record['eta_epoch_s'])}, " if record["eta_epoch_s"] >= 0.5 else ""
            eta = f"  ETA {epoch_left}run {duration(record['eta_s'])}"
        skipped = f"  skipped steps {record['skipped_steps']}" if record.get("skipped_steps") else ""
        return (f"epoch {record['epoch']} step {record['step']}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                f"{record['images_per_s']:.1f} img/s  data wait {100 * record['data_wait']:.0f}%{skipped}{eta}")
    if event == "compile":  # engine/compile.py
        return (f"compiled the model for {record['shape'][0]}x{record['shape'][1]} batches at step {record['step']} "
                f"({record['step_s']:.0f} s; {record['compiles']} compilations, at most {record['bound'] or '-'})")
    if event == "compiles":
        return f"epoch {record['epoch']}: {record['in_epoch']} compilations ({record['compiles']} in all)"
    if event == "workers":
        return f"{len(record['workers'])} workers: " + ", ".join(
            f"rank {w['rank']} on {w['host']} (pid {w['pid']})" for w in record["workers"])
    if event == "checkpoint":
        return f"checkpoint saved at step {record['step']}"
    if event == "checkpoint_requested":
        return f"checkpoint requested: saving at step {record['step']}"
    if event == "notice":  # engine/checkpoint_policy.py's Notice
        then = "then stopping" if record.get("stop") else "then going on"
        return f"{record['source']} notice: {record['detail']}; saving at step {record['step']}, {then}"
    if event == "world_size":  # engine/world_size.py
        return world_size_line(record)
    if event == "resume":
        changed = f" (changed: {record['changed']})" if record.get("changed") else ""
        return f"resumed at step {record['step']} (epoch {record['epoch']}) from {record['from']}{changed}"
    if event == "init_checkpoint":
        heads = record["reinitialised"]  # all of them in metrics.jsonl
        more = f" and {len(heads) - 4} more" if len(heads) > 4 else ""
        fresh = f"; class heads re-initialised (another number of classes): {', '.join(heads[:4])}{more}" if heads else ""
        return f"weights from {record['from']} (model.init_checkpoint){fresh}"
    return None


def read_metrics(run_dir: str | Path | RunDir) -> list[dict]:
    path = RunDir(run_dir).metrics
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def memory_usage(device: torch.device) -> dict:
    import psutil  # comes with ray[default]

    out = {"rss_gb": psutil.Process().memory_info().rss / 2 ** 30}
    if device.type == "cuda":
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out
