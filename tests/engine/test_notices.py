"""Notices from outside the run (a node's preemption, SIGTERM; engine/checkpoint_policy.py):
the run saves at the step after the notice, on every rank; a stopping notice stops every rank
right after that save, and the next run resumes from it without losing a step."""
from __future__ import annotations

from pathlib import Path

import pytest

from ddetr_dist.engine.checkpoint_policy import CheckpointPolicy, Notice, StopAfterSave
from ddetr_dist.engine.metrics import MetricsLog, console_line, read_metrics
from ddetr_dist.engine.train_state import Progress

from .engine_helpers import run_on_ranks, tiny_config


class Scripted:
    """Notices that arrive after given steps (the loop asks once per step)."""

    def __init__(self, at: dict[int, list[Notice]]):
        self.at, self.calls = at, 0

    def __call__(self) -> list[Notice]:
        self.calls += 1
        return self.at.get(self.calls, [])


def policy(tmp_path: Path, notices, every_steps: int = 0) -> CheckpointPolicy:
    return CheckpointPolicy(every_steps, tmp_path / "CHECKPOINT_NOW", MetricsLog(tmp_path / "metrics.jsonl", True),
                            notices)


def progress(step: int) -> Progress:
    return Progress(step=step)


def test_a_notice_saves_at_its_step_once_and_is_logged(tmp_path):
    drained = Notice("preemption", "Ray is draining node abc (ranks 1): it goes away in 60 s")
    p = policy(tmp_path, Scripted({3: [drained]}))
    saves = [step for step in range(1, 7) if p.after_step(progress(step), at_end=False)]
    assert saves == [3]  # the step the notice came after; once
    assert p.stop_requested == []  # Ray's notice: save and go on
    [record] = read_metrics(tmp_path)
    assert record["event"] == "notice" and record["step"] == 3 and record["source"] == "preemption"
    assert console_line(record) == ("preemption notice: Ray is draining node abc (ranks 1): it goes away in 60 s; "
                                    "saving at step 3, then going on")


def test_a_stopping_notice_at_an_epoch_end_waits_for_that_save(tmp_path):
    sigterm = Notice("sigterm", "rank 0 got SIGTERM", stop=True)
    p = policy(tmp_path, Scripted({2: [sigterm]}))
    assert not p.after_step(progress(1), at_end=False)
    # the step ends its epoch: the epoch's own save serves, and the stop is remembered for it
    assert not p.after_step(progress(2), at_end=True)
    assert p.stop_requested == [sigterm]


def test_without_notices_the_policy_is_as_before(tmp_path):
    p = CheckpointPolicy(2, tmp_path / "CHECKPOINT_NOW", MetricsLog(tmp_path / "metrics.jsonl", True))
    assert [s for s in range(1, 6) if p.after_step(progress(s), at_end=False)] == [2, 4]
    (tmp_path / "CHECKPOINT_NOW").touch()
    assert p.after_step(progress(5), at_end=False) and not (tmp_path / "CHECKPOINT_NOW").exists()


def _train_with_a_notice_on_rank_1(rank: int, cfg, run_dir: str, notice_after_step: int) -> dict:
    from ddetr_dist.engine.checkpointers import FolderCheckpointer
    from ddetr_dist.engine.loop import Trainer
    from ddetr_dist.engine.run_dir import RunDir

    sigterm = Notice("sigterm", "rank 1 got SIGTERM", stop=True)
    # only rank 1 hears it (SIGTERM to one process): every rank must still save and stop
    notices = Scripted({notice_after_step: [sigterm]} if rank == 1 else {})
    trainer = Trainer(cfg, RunDir(run_dir), FolderCheckpointer(RunDir(run_dir)), notices=notices)
    try:
        trainer.fit()
    except StopAfterSave as stop:
        return {"stopped_at": stop.step, "notices": stop.notices, "step": trainer.progress.step}
    return {"stopped_at": None, "step": trainer.progress.step}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stopping_notice_on_one_rank_saves_and_stops_every_rank_and_the_next_run_loses_no_step(tiny_data, tmp_path):
    run_dir = tmp_path / "stop"
    run_dir.mkdir()
    cfg = tiny_config(tiny_data, tmp_path, "name=stop", "train.max_steps=5", "data.val_shards=", "data.num_workers=0")
    ranks = run_on_ranks(_train_with_a_notice_on_rank_1, 2, cfg, str(run_dir), 2, tmp=tmp_path / "out")
    assert [r["stopped_at"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [2, 2]
    assert ranks[0]["notices"] == [Notice("sigterm", "rank 1 got SIGTERM", stop=True)]  # rank 0 learnt why
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if r.get("event") == "checkpoint"] == [2]
    assert [(r["step"], r["source"]) for r in records if r.get("event") == "notice"] == [(2, "sigterm")]
    assert not (run_dir / "model_final.pth").exists()  # stopped, not finished
    # the same run again: from step 2, every step once
    again = run_on_ranks(_train_with_a_notice_on_rank_1, 2, cfg, str(run_dir), 99, tmp=tmp_path / "out2")
    assert [r["step"] for r in again] == [5, 5]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if r.get("event") == "resume"] == [2]
    assert [r["step"] for r in records if r.get("event") == "train"] == [1, 2, 3, 4, 5]
