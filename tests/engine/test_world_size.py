"""Each start of the workers says its world size, global batch and lr rule (in metrics.jsonl
and on the console), and leaves the DeepSpeed JSON of the world size it runs at: with a
range of workers (docs/elastic.md) the world size changes between starts."""
from __future__ import annotations

import json

import pytest

from ddetr_dist.config import load_config
from ddetr_dist.engine.metrics import console_line, read_metrics
from ddetr_dist.engine.world_size import world_size_line, world_size_record

from .engine_helpers import run_trainer, tiny_config


def test_a_resize_record_says_the_global_batch_and_that_the_lr_stays():
    cfg = load_config(None, ["ray.num_workers=2-4", "data.batch_size=3", "train.grad_accum=2", "optim.lr=1e-4"])
    record = world_size_record(cfg, 2, step=40, epoch=1, from_world_size=4, steps_per_epoch=10)
    assert record["event"] == "world_size" and record["resized"]
    assert (record["batch_per_worker"], record["global_batch"], record["workers_range"]) == (6, 12, [2, 4])
    assert (record["lr_rule"], record["lr"]) == ("fixed", 1e-4)
    line = world_size_line(record)
    assert "resized from 4 to 2 workers at step 40: global batch 24 -> 12 (6 per worker)" in line
    assert "elastic: 2-4 workers" in line and "lr 0.0001 fixed" in line
    assert console_line(record) == line  # what rank 0 prints when it logs the record


def test_a_first_start_is_no_resize():
    cfg = load_config(None, ["ray.num_workers=2"])
    record = world_size_record(cfg, 2, step=0, epoch=0, from_world_size=None, steps_per_epoch=5)
    assert not record["resized"] and record["global_batch"] == 4
    assert world_size_line(record).startswith("2 worker(s) from step 0: global batch 4 (2 per worker)")
    assert "elastic" not in world_size_line(record)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_each_start_records_its_world_size_and_writes_its_deepspeed_json(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(tiny_config(tiny_data, tmp_path, "name=run", "train.max_steps=2"), 2, run_dir)
    assert json.loads((run_dir / "deepspeed_config.json").read_text())["train_batch_size"] == 4
    run_trainer(tiny_config(tiny_data, tmp_path, "name=run", "train.max_steps=3"), 1, run_dir)
    starts = [r for r in read_metrics(run_dir) if r.get("event") == "world_size"]
    assert [(r["world_size"], r["from_world_size"], r["resized"], r["global_batch"], r["step"]) for r in starts] == \
        [(2, None, False, 4, 0), (1, 2, True, 2, 2)]
    # what the 1-worker engine ran with, not the 2-worker run's
    assert json.loads((run_dir / "deepspeed_config.json").read_text())["train_batch_size"] == 2
