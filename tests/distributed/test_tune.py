"""`ddetr tune`: the sweep file's checks (no Ray), and one sweep of a tiny config run as users
run it (a subprocess with its own local Ray) that covers a finished trial, a trial that
raises, one that ASHA stops, a driver killed mid-sweep and resumed, the table, the CSV and
the best config."""
from __future__ import annotations

import csv
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ddetr_dist.config import load_config, to_dict
from ddetr_dist.on_ray.sweep_file import load_sweep, tune_search_space
from ddetr_dist.on_ray.tune import differing_keys
from ddetr_dist.tune import main as tune_main

from .ray_helpers import environment, records, registered_checkpoint_steps, wait_for, write_tiny_config

REPO = Path(__file__).resolve().parents[2]

# Three trials, one at a time, in this order (points_to_evaluate): deterministic, no timing
# races. Each trains 5 epochs of 8 steps (1 worker, 16 samples per epoch) and evaluates
# after each epoch; ASHA judges at epochs 1, 2 and 4, so a stopped trial has epochs left to
# lose however slowly its stop arrives. The base config's lr is 1e-4: the best config differs.
SWEEP = """\
name: tiny_sweep
metric: val_loss
num_samples: 3
space:
  optim.lr: {loguniform: [1.0e-9, 1.0e-2]}
  model.backbone_weights: {choice: ["", /nonexistent/resnet18.pth]}
search:
  points_to_evaluate:
    - {optim.lr: 1.0e-3, model.backbone_weights: ""}                          # learns: the best
    - {optim.lr: 1.0e-3, model.backbone_weights: /nonexistent/resnet18.pth}   # raises in its worker
    - {optim.lr: 1.0e-9, model.backbone_weights: ""}                          # learns nothing: ASHA stops it
scheduler: {type: asha, time_attr: epoch, grace_period: 1, reduction_factor: 2}
resources: {workers_per_trial: 1, max_concurrent_trials: 1}
"""
OVERRIDES = ["optim.lr=1e-4", "optim.epochs=5", "data.samples_per_epoch=16", "train.pictures=0",
             "ray.max_failures=0"]
STEPS = 40


def saved_by_tune(sweep_dir: Path, trial_dir: Path) -> bool:
    """Tune saves its experiment state every 10 s at most: a trial it has not saved yet is
    drawn anew after a restart, with another id (and run directory)."""
    trial_id = trial_dir.name.removeprefix("trial_")
    for path in sweep_dir.glob("experiment_state-*.json"):
        try:
            if trial_id in path.read_text():
                return True
        except FileNotFoundError:  # replaced while we looked
            pass
    return False


def tune_command(config: Path, sweep: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "ddetr_dist.tune", "--config", str(config), "--sweep", str(sweep), *overrides]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sweep_errors_asha_resume_table_and_best_config(tiny_data, tmp_path):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "tiny")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP)
    sweep_dir = tmp_path / "runs" / "tiny_sweep"
    command = tune_command(config, sweep, *OVERRIDES)

    # the driver dies while the first trial trains (after its first checkpoint) ...
    log = tmp_path / "first.log"
    proc = subprocess.Popen(command, env=environment(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        first = wait_for(lambda: next((d for d in sweep_dir.glob("trial_*_00000")
                                       if registered_checkpoint_steps(d) and saved_by_tune(sweep_dir, d)), None),
                         300, "the first trial's first checkpoint", proc)
        proc.send_signal(signal.SIGKILL)  # Ray's reaper takes the local cluster down with it
        proc.wait(timeout=60)
    finally:
        proc.kill()
    killed_at = max(r["step"] for r in records(first, "train"))
    assert killed_at < STEPS, "the first trial finished before the driver was killed"

    # ... and the same command resumes the sweep: that trial from its checkpoint, then the others
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=360)
    output = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 1, output  # a trial failed
    assert "resuming sweep" in done.stderr, output
    resumed = records(first, "resume")
    assert len(resumed) == 1 and 8 <= resumed[0]["step"] <= killed_at, resumed
    assert [r["step"] for r in records(first, "train")] == list(range(1, STEPS + 1))  # every step once

    rows = {r["trial"][-5:]: r for r in csv.DictReader((sweep_dir / "results.csv").open())}
    assert sorted(rows) == ["00000", "00001", "00002"]
    good, broken, stopped = rows["00000"], rows["00001"], rows["00002"]
    assert (good["status"], int(good["steps"])) == ("done", STEPS), good
    assert broken["status"] == "ERROR" and "/nonexistent/resnet18.pth" in broken["error"], broken
    assert stopped["status"] == "stopped early" and 8 <= int(stopped["steps"]) < STEPS, stopped
    assert float(stopped["best_val_loss"]) > float(good["best_val_loss"])
    assert list(rows) == ["00000", "00002", "00001"]  # best first, the failed trial last
    assert f"1 of 3 trial(s) failed: {broken['trial']}" in done.stderr
    table = done.stdout[done.stdout.index("sweep tiny_sweep: 3 trial(s)"):]
    for row in rows.values():
        assert row["trial"] in table
    # the worker's check (dist.worker.check_inputs): a FileNotFoundError that is not retried
    assert "stopped early" in table and "ERROR: ddetr_dist.errors.InputNotFoundError" in table

    # each trial is a `ddetr train` run in its own directory under the sweep's
    run_dir = Path(good["run_dir"])
    assert run_dir.parent == sweep_dir and (run_dir / "model_final.pth").exists()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    trial_cfg = load_config(run_dir / "config.yaml")
    assert (trial_cfg.name, trial_cfg.output_dir, trial_cfg.optim.lr) == (run_dir.name, str(sweep_dir), 1e-3)
    assert len(records(run_dir, "eval")) == 5  # one per epoch: what ASHA compared

    # the best config trains as it is, and differs from the base by the best trial's values
    best = load_config(sweep_dir / "best_config.yaml")
    base = load_config(config, OVERRIDES)
    assert differing_keys(to_dict(base), to_dict(best)) == ["name", "optim.lr", "ray.num_workers"]
    # the sweep's resources are the trials' config too
    assert (best.name, best.optim.lr, best.ray.num_workers) == ("tiny_sweep-best", 1e-3, 1)
    assert f"ddetr train --config {sweep_dir / 'best_config.yaml'}" in done.stdout


def write_sweep(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad_sweep.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("space: {optim.lrr: {loguniform: [1e-5, 1e-3]}}", "'optim.lrr' is not a config key. Did you mean 'optim.lr'?"),
    ("schedular: {type: asha}\nspace: {optim.lr: {choice: [1e-3]}}",
     "unknown key 'schedular'. Did you mean 'scheduler'?"),
    ("space: {optim.lr: {logunifrom: [1e-5, 1e-3]}}", "unknown domain 'logunifrom'. Did you mean 'loguniform'?"),
    ("space: {model.num_queries: {uniform: [10, 20]}}", "config key 'model.num_queries': expected an integer"),
    ("space: {optim.lr: {choice: [0, 1e-3]}}", "config key 'optim.lr': must be > 0"),
    ("space: {name: {choice: [a, b]}}", "'name' is set by the sweep for each trial"),
    ("space: {ray.num_workers: {choice: [1, 2]}}", "'ray.num_workers' is the same for every trial (the sweep places "
     "trials by it): set it with resources.workers_per_trial"),
    ("space: {optim.lr: 1e-3}", "space key 'optim.lr': give one domain"),
    ("metric: mAP\nspace: {optim.lr: {choice: [1e-3]}}",
     "'metric' 'mAP' is not reported by the workers. Did you mean 'AP'?"),
    ("space: {optim.lr: {choice: [1e-3]}}\nscheduler: {type: asha, grace_perod: 2}",
     "unknown key 'scheduler.grace_perod'. Did you mean 'grace_period'?"),
    ("space: {optim.lr: {choice: [1e-3]}}\nsearch: {points_to_evaluate: [{optim.lr: 1e-3}, {optim.lr: 2e-3}]}",
     "lists 2 points but num_samples is 1"),
    ("space: {optim.lr: {uniform: [1e-5, 1e-3]}}\nsearch: {algorithm: grid}", "optim.lr must be grid_search or choice"),
])
def test_bad_sweep_file_fails_before_ray_naming_the_key_and_the_file(tiny_data, tmp_path, capsys, text, message):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "tiny")
    sweep = write_sweep(tmp_path, text)
    assert tune_main(["--config", str(config), "--sweep", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert f"sweep file {sweep}: " in err and message in err, err
    assert not (tmp_path / "runs").exists()


def test_sweep_values_are_typed_by_the_config_and_grid_searches_choices(tiny_data, tmp_path):
    config = load_config(write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "tiny"))
    sweep = load_sweep(write_sweep(tmp_path, """\
space:
  optim.lr: {choice: [1e-4, 3e-4]}          # YAML reads these as strings: the config makes them floats
  data.train_scales: {choice: [[96], [96, 128]]}
num_samples: 2
search: {algorithm: grid, points_to_evaluate: [{optim.lr: 2e-4}]}
"""), config)
    assert sweep.name == "bad_sweep" and (sweep.metric, sweep.mode) == ("AP", "max")
    assert sweep.space["optim.lr"].args == (1e-4, 3e-4)
    assert sweep.space["data.train_scales"].args == ((96,), (96, 128))
    assert sweep.search.points_to_evaluate == [{"optim.lr": 2e-4}]
    space = tune_search_space(sweep)
    assert space["optim.lr"] == {"grid_search": [1e-4, 3e-4]}


CONFIG_OF_SWEEP = {"demo.yaml": "demo.yaml", "lr_queries.yaml": "base.yaml"}


@pytest.mark.parametrize("sweep", sorted(p.name for p in (REPO / "configs" / "sweeps").glob("*.yaml")))
def test_shipped_sweep_files_check_against_their_configs(sweep):
    config = REPO / "configs" / CONFIG_OF_SWEEP[sweep]  # a new sweep file: add its config above
    load_sweep(REPO / "configs" / "sweeps" / sweep, load_config(config))
