"""Run `ddetr train` as users do (a subprocess that starts its own local Ray) on a tiny
config, and read what it left in the run directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ddetr_dist.engine.run_dir import RunDir
from engine.engine_helpers import FROM_SCRATCH, TINY_OVERRIDES

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


def write_tiny_config(path: Path, data_dir: Path | str, out_dir: Path | str, name: str) -> Path:
    tree: dict = {"name": name, "output_dir": str(out_dir)}
    for text in TINY_OVERRIDES + FROM_SCRATCH + [f"data.train_shards={Path(data_dir) / 'train' / 'shards'}",
                                                 f"data.val_shards={Path(data_dir) / 'val' / 'shards'}",
                                                 "ray.num_workers=2"]:
        key, value = text.split("=", 1)
        section, leaf = key.split(".")
        tree.setdefault(section, {})[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(tree))
    return path


def train_command(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "ddetr_dist.train", "--config", str(config), *overrides]


def environment(**extra: str) -> dict:
    return {**os.environ, **RAY_ENV, **extra}


def run_train(config: Path, *overrides: str, timeout: float = 300, cwd: Path | None = None,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """`env`: more environment for the driver, hence for the workers of its local Ray."""
    return subprocess.run(train_command(config, *overrides), env=environment(**(env or {})), capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def start_train(config: Path, *overrides: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(train_command(config, *overrides), env=environment(**(env or {})), stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def records(run_dir: Path, event: str | None = None) -> list[dict]:
    path = RunDir(run_dir).metrics
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            continue
    return [r for r in out if event is None or r.get("event") == event]


def registered_checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray's controller has registered (and will restore from):
    a worker's report returns before the controller records it, so a worker killed in
    between restarts from the checkpoint before."""
    path = run_dir / "checkpoint_manager_snapshot.json"
    try:
        snapshot = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or being written
        return []
    return [r["metrics"]["step"] for r in snapshot.get("checkpoint_results", [])]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
