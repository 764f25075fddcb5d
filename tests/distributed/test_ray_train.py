"""`ddetr train` end to end: a subprocess starts its own local Ray, 2 Ray Train workers run
DeepSpeed; worker failure, driver restart and bad configs."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from ddetr_dist.models import build_model, load_official_checkpoint
from ddetr_dist.train import main as train_main

from .ray_helpers import environment, records, registered_checkpoint_steps, run_train, start_train, wait_for, write_tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_two_workers_zero2_train_and_write_the_run_directory(tiny_data, tmp_path):
    # relative paths, as a user in a project directory writes them: relative to where `ddetr train` runs
    (tmp_path / "data").symlink_to(tiny_data)
    config = write_tiny_config(tmp_path / "tiny.yaml", "data", "runs", "e2e")
    # a token there is (as after `ray get-auth-token --generate`): Ray turns token auth on for
    # the local Ray and would warn about it on the console
    done = run_train(config, "train.zero_stage=2", "train.max_steps=10", "train.checkpoint_every_steps=5", cwd=tmp_path,
                     env={"RAY_AUTH_TOKEN": "5" * 64})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "e2e"
    train = records(run_dir, "train")
    assert [r["step"] for r in train] == list(range(1, 11))
    for r in train:
        assert {"step", "epoch", "time", "loss", "loss_ce", "loss_bbox", "loss_giou", "lr", "images_per_s",
                "data_wait"} <= set(r)
    losses = torch.tensor([r["loss"] for r in train])
    assert torch.isfinite(losses).all()
    assert losses[-4:].mean() < losses[:4].mean(), losses  # it learns
    workers = records(run_dir, "workers")[0]["workers"]
    assert sorted(w["rank"] for w in workers) == [0, 1] and len({w["pid"] for w in workers}) == 2
    checkpoints = sorted(run_dir.glob("checkpoint_0*"))
    assert len(checkpoints) == 2  # ray.keep_checkpoints
    assert (checkpoints[-1] / "meta.json").exists() and (checkpoints[-1] / "portable.pt").exists()
    assert (run_dir / "config.yaml").exists() and (run_dir / "deepspeed_config.json").exists()
    model = build_model(build_config(run_dir))[0]
    assert load_official_checkpoint(run_dir / "model_final.pth", model) == []
    # evaluated at the end, on rank 0's gathered detections; the driver prints the table
    assert records(run_dir, "eval")[-1]["step"] == 10 and (run_dir / "eval" / "00000010" / "detections.json").exists()
    assert "AP50" in done.stdout and "tensorboard --logdir" in done.stdout
    assert_console_reads_as_lines(done.stdout + done.stderr)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "final_metrics.json").read_text())["step"] == 10
    # `ddetr eval` on the run directory: its config (2 workers -> Ray) and newest checkpoint
    again = subprocess.run([sys.executable, "-m", "ddetr_dist.eval", "--checkpoint", "runs/e2e"], cwd=tmp_path,
                           env=environment(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "AP50" in again.stdout and "8 images" in again.stdout
    manual = list((run_dir / "eval").glob("manual-*/detections.json"))
    assert len(manual) == 1
    assert json.loads(manual[0].read_text()) == json.loads((run_dir / "eval" / "00000010" / "detections.json").read_text())


def assert_console_reads_as_lines(console: str) -> None:
    """What a person reads (#14): a step line with its ETA, the closing `ddetr predict`
    command; no machine records (they are in metrics.jsonl) and no Ray Train chatter."""
    ray_prefix = re.compile(r"^(\x1b\[\d+m)?\([\w ]+pid=\d+[^)]*\)(\x1b\[0m)? ?")  # "(RayTrainWorker pid=7) "
    lines = [ray_prefix.sub("", line).strip() for line in console.splitlines()]
    assert not [line for line in lines if line.startswith("{")], console[-3000:]
    assert "TrainingReport(" not in console and "Checkpoint successfully created" not in console, console[-3000:]
    assert "Token authentication is enabled" not in console, console[-3000:]
    assert any(" step " in line and " ETA " in line for line in lines), console[-3000:]
    assert any(line.startswith("ddetr predict ") and "--checkpoint" in line for line in lines), console[-3000:]


def build_config(run_dir):
    from ddetr_dist.config import load_config

    return load_config(run_dir / "config.yaml")


def test_a_worker_killed_while_its_save_is_pending_restarts_from_the_checkpoint_before(tiny_data, tmp_path):
    # rank 1's background write of the step-8 checkpoint (an epoch's end: 8 steps of 2 ranks x 2
    # of the 32 images) waits (engine/faults.py) while both ranks train on; a spot node lost
    # then must not leave a checkpoint counted without its part
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "fault")
    run_dir, pending = tmp_path / "runs" / "fault", tmp_path / "rank-1-save-of-step-8-pending"
    proc = start_train(config, "train.max_steps=20", "train.checkpoint_every_steps=4", log=tmp_path / "log.txt",
                       env={"DDETR_INJECT_SLOW_SAVE": f"8@1:{pending}"})
    try:
        wait_for(lambda: 4 in registered_checkpoint_steps(run_dir), 240, "the checkpoint of step 4", proc)
        wait_for(pending.exists, 240, "rank 1's save of step 8", proc)
        # both ranks train on while it is pending, until the next save (step 12) waits for it
        wait_for(lambda: max(r["step"] for r in records(run_dir, "train")) >= 11, 120, "step 11", proc)
        assert 8 not in registered_checkpoint_steps(run_dir)  # (without the wait: registered by now)
        victim = next(w for w in records(run_dir, "workers")[0]["workers"] if w["rank"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = max(r["step"] for r in records(run_dir, "train"))
        assert proc.wait(timeout=600) == 0, (tmp_path / "log.txt").read_text()[-5000:]
    finally:
        proc.kill()
    assert killed_at <= 12, "the run went past the next save: rank 1's save of step 8 was not pending"
    resumed = records(run_dir, "resume")
    assert len(resumed) == 1 and resumed[0]["step"] == 4 and resumed[0]["exact"], resumed
    # the redone steps replaced the lost ones: the log reads as one run, every step once
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, 21))
    assert records(run_dir, "final")[-1]["step"] == 20
    assert len(records(run_dir, "workers")) == 2  # the first group and its replacement


def test_restarted_driver_continues_and_a_finished_run_extends(tiny_data, tmp_path):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "driver")
    run_dir = tmp_path / "runs" / "driver"
    proc = start_train(config, "train.max_steps=16", "train.checkpoint_every_steps=4", log=tmp_path / "log1.txt")
    try:
        wait_for(lambda: registered_checkpoint_steps(run_dir), 240, "a registered checkpoint", proc)
        proc.send_signal(signal.SIGKILL)  # the driver dies; Ray's reaper takes the local cluster down
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert not records(run_dir, "final")
    again = run_train(config, "train.max_steps=16", "train.checkpoint_every_steps=4")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert records(run_dir, "resume")[0]["step"] >= 4
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, 17))
    more = run_train(config, "train.max_steps=20", "train.checkpoint_every_steps=4")
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert records(run_dir, "resume")[-1]["step"] == 16
    assert records(run_dir, "final")[-1]["step"] == 20


@pytest.mark.parametrize("override, message", [
    ("train.zero_stag=2", "unknown config key 'train.zero_stag'. Did you mean 'zero_stage'?"),
    ("train.zero_stage=4", "'train.zero_stage': must be 0, 1, 2 or 3"),
    ("train.precision=fp8", "'train.precision': must be one of fp32, bf16, fp16"),
    ("data.train_shards=/nonexistent/shards", "'data.train_shards' = '/nonexistent/shards'"),
])
def test_bad_config_fails_before_ray_starts(tiny_data, tmp_path, capsys, override, message):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "bad")
    assert train_main(["--config", str(config), override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_more_workers_than_the_cluster_can_place_fail_before_workers_start(tiny_data, tmp_path):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "big")
    done = run_train(config, "ray.cpus_per_worker=512", timeout=120)
    assert done.returncode == 2
    assert "'ray.num_workers' (2) and 'ray.cpus_per_worker' (512): each worker needs 512 CPU(s) on one node" \
        in done.stderr
    assert not records(tmp_path / "runs" / "big")


def test_a_deterministic_worker_error_ends_the_run_after_one_attempt(tiny_data, tmp_path):
    """Non-finite losses at steps 0, 1, 2 with train.max_bad_steps=2: NonFiniteLossError
    (NotRetryable) at step 1 on every rank. Ray would restart the workers ray.max_failures=3
    times to meet it again; it ends the run at once, with its message (issue 12, bug 5)."""
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "nan")
    # the env var reaches the workers: a local Ray's processes inherit the driver's environment
    done = run_train(config, "train.max_bad_steps=2",
                     "ray.max_failures=3", "train.max_steps=6", env={"DDETR_INJECT_NONFINITE_LOSS": "0,1,2"})
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "nan"
    assert len(records(run_dir, "workers")) == 1, done.stderr[-3000:]  # one worker group: no restart
    assert [r["step"] for r in records(run_dir, "skipped_step")] == [1, 2]
    # `ddetr train`'s own line, after Ray's logs: the workers' message, not Ray's wrapping
    said = [line for line in done.stderr.splitlines() if line.startswith("ddetr train: ")]
    assert len(said) == 1 and said[0].startswith(f"ddetr train: training run {run_dir} failed, not retried"), said
    assert "NonFiniteLossError: 2 steps in a row had a non-finite loss" in said[0], said
    assert "train.max_bad_steps=2" in said[0]
