"""Checkpoints written in the background (train.async_checkpoint): a save returns once the
state is copied and the loop trains on, yet a checkpoint is counted (meta.json) and
registered only when all of its files are written; the next save and the end of the run
wait for a pending one; an error in the writer's thread fails the run."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import torch

from ddetr_dist.engine import train_state
from ddetr_dist.engine.checkpoint_writer import CheckpointWriteError, CheckpointWriter
from ddetr_dist.engine.checkpointers import FolderCheckpointer
from ddetr_dist.engine.metrics import read_metrics
from ddetr_dist.engine.run_dir import RunDir
from ddetr_dist.engine.train_state import Progress, check_complete

from .engine_helpers import TINY_OVERRIDES, tiny_config

# ----------------------------------------------------------------- the writer alone


def test_submit_returns_before_the_job_ends_and_wait_waits_for_it():
    writer, release, done = CheckpointWriter(), threading.Event(), []
    writer.submit(1, lambda: (release.wait(10), done.append(1)))
    assert writer.pending and done == []
    release.set()
    writer.wait()
    assert done == [1] and not writer.pending


def test_the_next_save_waits_for_the_pending_one():
    writer, order = CheckpointWriter(), []
    writer.submit(1, lambda: (time.sleep(0.2), order.append(1)))
    writer.submit(2, lambda: order.append(2))
    writer.wait()
    assert order == [1, 2]


def test_an_error_in_the_thread_is_raised_in_the_loop_once():
    writer = CheckpointWriter()
    writer.submit(7, lambda: (_ for _ in ()).throw(OSError("No space left on device")))
    writer._thread.join()
    with pytest.raises(CheckpointWriteError, match="step 7 failed: OSError: No space left"):
        writer.poll()
    writer.wait()  # raised once: the loop's handler decides, not a second report


def test_a_save_is_announced_in_the_loops_thread_once_it_is_complete_and_never_before():
    announced, release = [], threading.Event()
    writer = CheckpointWriter(on_complete=lambda saved, stall_s, write_s: announced.append(
        (saved["step"], threading.current_thread() is threading.main_thread(), write_s >= 0.1)))
    writer.submit(4, lambda: (release.wait(10), time.sleep(0.1)), stall_s=0.01)
    writer.poll()
    assert announced == []  # still writing: a "checkpoint" record now would promise what is not there
    release.set()
    writer._thread.join()
    writer.poll()
    writer.poll()
    assert announced == [(4, True, True)]
    failing = CheckpointWriter(on_complete=lambda *a: announced.append(a))
    failing.submit(5, lambda: 1 / 0)
    with pytest.raises(CheckpointWriteError):
        failing.wait()
    assert len(announced) == 1  # a failed save is never announced


def test_without_background_the_job_runs_at_once_and_raises_there():
    writer, done = CheckpointWriter(background=False), []
    writer.submit(1, lambda: done.append(1))
    assert done == [1] and not writer.pending
    with pytest.raises(CheckpointWriteError):
        writer.submit(2, lambda: 1 / 0)


# ----------------------------------------------------------------- the train loop, one process


class RecordingCheckpointer(FolderCheckpointer):
    """Checks, whenever a checkpoint is registered, that it is complete then."""

    def __init__(self, run_dir):
        super().__init__(run_dir, keep=10)
        self.registered: list[int] = []

    def register(self, folder, step, metrics):
        check_complete(folder, Progress.read(folder))  # raises on a missing or short file
        self.registered.append(step)
        super().register(folder, step, metrics)


def make_trainer(tiny_data, tmp_path, *overrides):
    from ddetr_dist.engine.loop import Trainer

    cfg = tiny_config(tiny_data, tmp_path, "name=async", "train.max_steps=4", "train.checkpoint_every_steps=2",
                      "train.eval_every_epochs=0", "data.val_shards=", *overrides)
    run_dir = RunDir(tmp_path / "async")
    run_dir.path.mkdir(parents=True)
    checkpointer = RecordingCheckpointer(run_dir)
    return Trainer(cfg, run_dir, checkpointer), checkpointer, run_dir


@pytest.mark.timeout(300)
def test_a_save_returns_before_its_files_are_written_and_counts_only_when_complete(
        tiny_data, tmp_path, one_process, monkeypatch):
    trainer, checkpointer, run_dir = make_trainer(tiny_data, tmp_path)
    took_step_3 = threading.Event()
    seen_while_writing = {}
    write = train_state.WrittenLater.__call__

    def slow_write(self):
        if self.progress.step == 2:  # the first save: its files wait until the loop took step 3
            # a synchronous save would block the loop here, and step 3 would never come
            seen_while_writing["loop_went_on"] = took_step_3.wait(120)
            seen_while_writing["meta"] = (self.directory / train_state.META).exists()
            seen_while_writing["registered"] = list(checkpointer.registered)
            seen_while_writing["complete"] = [d.name for d in checkpointer._complete()]
        write(self)

    step, at_step_2 = trainer._optimizer_step, {}

    def counting_step(window):
        step(window)
        if trainer.progress.step == 2:
            at_step_2.update({n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()})
        if trainer.progress.step == 3:
            took_step_3.set()

    monkeypatch.setattr(train_state.WrittenLater, "__call__", slow_write)
    monkeypatch.setattr(trainer, "_optimizer_step", counting_step)
    progress = trainer.fit()

    assert progress.step == 4
    assert seen_while_writing == {"loop_went_on": True, "meta": False, "registered": [], "complete": []}
    assert checkpointer.registered == [2, 4]  # in order, each complete when registered (RecordingCheckpointer)
    saves = [r for r in read_metrics(run_dir.path) if r.get("event") == "checkpoint"]
    assert [r["step"] for r in saves] == [2, 4] and all(r["stall_s"] >= 0 for r in saves)
    # the checkpoint of step 2 holds the weights of step 2, written while step 3 changed them in place
    ckpt = run_dir.folder_checkpoint(2)
    saved = Progress.read(ckpt)
    assert saved.step == 2 and set(saved.files) == {train_state.PORTABLE, "rank_state/rank_0.pt"}
    step2 = torch.load(ckpt / train_state.PORTABLE, weights_only=True)["model"]
    assert all(torch.equal(step2[name], value) for name, value in at_step_2.items())
    assert any(not torch.equal(value, p) for value, p in zip(at_step_2.values(), trainer.engine.module.parameters()))


@pytest.mark.timeout(300)
def test_an_error_in_the_background_write_fails_the_run_and_counts_nothing(
        tiny_data, tmp_path, one_process, monkeypatch):
    trainer, checkpointer, run_dir = make_trainer(tiny_data, tmp_path)

    def failing_write(self):
        raise OSError("No space left on device")

    monkeypatch.setattr(train_state.WrittenLater, "__call__", failing_write)
    with pytest.raises(CheckpointWriteError, match="step 2 failed: OSError: No space left on device"):
        trainer.fit()
    assert trainer.progress.step < 4  # it did not train on to the end, nor write model_final.pth
    assert not run_dir.final_model.exists()
    assert checkpointer.registered == [] and checkpointer._complete() == []


@pytest.mark.timeout(300)
def test_a_synchronous_save_is_complete_when_it_returns(tiny_data, tmp_path, one_process, monkeypatch):
    trainer, checkpointer, run_dir = make_trainer(tiny_data, tmp_path, "train.async_checkpoint=false")
    save = trainer.save_checkpoint

    def checked_save(metrics):
        save(metrics)
        assert checkpointer.registered[-1] == trainer.progress.step

    monkeypatch.setattr(trainer, "save_checkpoint", checked_save)
    trainer.fit()
    assert checkpointer.registered == [2, 4]


# ----------------------------------------------------------------- the benchmark


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_checkpoint_prints_the_sync_and_async_stall_per_save_and_their_ratio(tiny_data, tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "ddetr_dist.cli", "bench", "checkpoint", "--saves", "2", "--every", "1",
               "--dir", str(tmp_path), "--json", str(out), *TINY_OVERRIDES, "ray.num_workers=1",
               f"data.train_shards={tiny_data / 'train' / 'shards'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "sync stall" in done.stdout and "async/sync" in done.stdout and "target async <= 0.20 x sync" in done.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["name"] == "(a) ZeRO-0, 1 process" and row["checkpoint_mb"] > 0
    assert row["stall_s"]["sync"] > 0 and row["stall_s"]["async"] > 0
    assert row["ratio"] == pytest.approx(row["stall_s"]["async"] / row["stall_s"]["sync"])


def test_a_slow_save_injection_without_its_marker_is_refused(monkeypatch):
    # the marker is how a test knows the save is pending: without it, it would wait in vain
    from ddetr_dist.engine.faults import INJECT_SLOW_SAVE_ENV, InjectedFaults

    monkeypatch.setenv(INJECT_SLOW_SAVE_ENV, "8@1")
    with pytest.raises(ValueError, match="name the marker file"):
        InjectedFaults()
