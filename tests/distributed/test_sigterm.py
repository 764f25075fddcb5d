"""SIGTERM mid-run (a Kubernetes eviction, Slurm's preemption, `ray job stop`), on a local
Ray with 2 workers: to a worker, the run saves at the next step and Ray restarts the workers
from it; to the driver, the run saves at the next step and the driver exits 143; the same
command then resumes from that step. Every step is logged once (docs/preemption.md)."""
from __future__ import annotations

import os
import signal

import pytest

from .ray_helpers import records, registered_checkpoint_steps, run_train, start_train, wait_for, write_tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 14  # 2 workers, 32 images, batch 2: 8 steps an epoch (whose end saves anyway)


def trained_to(run_dir, step: int):
    return lambda: any(r["step"] >= step for r in records(run_dir, "train"))


def test_sigterm_to_a_worker_then_to_the_driver_saves_at_the_next_step_and_the_run_resumes(tiny_data, tmp_path):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "sigterm")
    run_dir = tmp_path / "runs" / "sigterm"
    log = tmp_path / "log1.txt"
    proc = start_train(config, f"train.max_steps={STEPS}", log=log)
    try:
        # a worker: Kubernetes evicting its pod, Slurm preempting its node
        wait_for(trained_to(run_dir, 2), 300, "step 2", proc)
        victim = next(w for w in records(run_dir, "workers")[0]["workers"] if w["rank"] == 1)
        os.kill(victim["pid"], signal.SIGTERM)
        [notice] = wait_for(lambda: records(run_dir, "notice"), 120, "the SIGTERM notice", proc)
        assert notice["source"] == "sigterm" and notice["stop"] and f"pid {victim['pid']}" in notice["detail"]
        worker_step = notice["step"]
        wait_for(lambda: len(records(run_dir, "resume")) == 1, 300, "the workers' restart", proc)
        assert records(run_dir, "resume")[0]["step"] == worker_step  # the save at the notice: no step lost
        # the driver: `ray job stop`, the head pod evicted
        wait_for(trained_to(run_dir, worker_step + 2), 300, f"step {worker_step + 2}", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, log.read_text()[-5000:]
    finally:
        proc.kill()
    driver_notice = records(run_dir, "notice")[-1]
    assert driver_notice["source"] == "driver" and driver_notice["stop"]
    driver_step = driver_notice["step"]
    assert worker_step < driver_step < STEPS, "the run ended before the SIGTERMs"
    assert max(registered_checkpoint_steps(run_dir)) == driver_step  # saved, and registered before exiting
    assert not records(run_dir, "final")
    assert "stopped on SIGTERM after saving a checkpoint" in log.read_text()
    again = run_train(config, f"train.max_steps={STEPS}")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert records(run_dir, "resume")[-1]["step"] == driver_step
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, STEPS + 1))
    assert records(run_dir, "final")[-1]["step"] == STEPS
