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
        if record.get("event") == "train":
            log.info("epoch %d step %d  loss %.4f  lr %.2e  %.1f img/s  data wait %.0f%%%s", record["epoch"],
                     record["step"], record["loss"], record["lr"], record["images_per_s"],
                     100 * record["data_wait"], f"  skipped steps {record['skipped_steps']}"
                     if record.get("skipped_steps") else "")
        elif record.get("event") != "worker":
            log.info("%s", json.dumps(record))


def read_metrics(run_dir: str | Path | RunDir) -> list[dict]:
    path = RunDir(run_dir).metrics
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def memory_usage(device: torch.device) -> dict:
    import psutil  # comes with ray[default]

    out = {"rss_gb": psutil.Process().memory_info().rss / 2 ** 30}
    if device.type == "cuda":
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out
