"""The notices a Ray worker hears (on_ray/preemption.py), in one process without a cluster:
Ray's preemption info as one readable notice per new preemption, SIGTERM to a worker as a
stopping notice with a bounded grace, SIGTERM to the driver as a request to the workers
with a bounded wait. The same on a real cluster: tests/cluster/test_preemption.py."""
from __future__ import annotations

import os
import signal
import time

import pytest
from ray.train import PreemptionInfo

from ddetr_dist.engine.checkpoint_policy import Notice
from ddetr_dist.on_ray import preemption
from ddetr_dist.on_ray.preemption import (PreemptionNotices, SigtermNotices, TrainingStopped, preemption_detail,
                                          saving_on_sigterm)


def test_each_new_preemption_is_one_notice_that_says_which_node_and_when():
    drained = PreemptionInfo(deadline_ms=int((time.time() + 60) * 1000), preempted_node_to_ranks={"ab" * 28: [1]})
    infos = iter([None, drained, drained, drained])
    notices = PreemptionNotices(read=lambda: next(infos))
    seen = [notices() for _ in range(4)]
    assert [len(n) for n in seen] == [0, 1, 0, 0]  # Ray keeps saying it: saved once
    [notice] = seen[1]
    assert notice.source == "preemption" and not notice.stop  # save and go on
    assert notice.detail.startswith(f"Ray is draining node {'ab' * 6} (ranks 1) for preemption: it goes away in ")
    assert preemption_detail(PreemptionInfo(None, {"n1": [0, 1]})).endswith("without a deadline")


@pytest.fixture
def restore_sigterm():
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def test_sigterm_to_a_worker_is_a_stopping_notice_and_a_second_one_ends_it(restore_sigterm):
    ended = []
    signal.signal(signal.SIGTERM, lambda *_: ended.append("previous handler"))  # Ray's: exit
    sigterm = SigtermNotices(grace_s=60, rank=1)
    sigterm.install()
    assert sigterm() == []
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)  # the handler runs in this (main) thread
    [notice] = sigterm()
    assert notice.stop and notice.source == "sigterm" and notice.detail.startswith("rank 1 on ")
    assert sigterm() == [] and ended == []  # one notice; the process goes on to save
    with pytest.raises(SystemExit):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
    assert ended == ["previous handler"]


def test_a_worker_that_cannot_save_within_its_grace_ends_anyway(restore_sigterm):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sigterm = SigtermNotices(grace_s=0.3, rank=0)
    sigterm.install()
    with pytest.raises(SystemExit) as ended:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(3)  # a loop stuck in a step
    assert ended.value.code == 143


def test_sigterm_to_the_driver_asks_the_workers_and_waits_a_bounded_time(monkeypatch, restore_sigterm):
    asked = []
    monkeypatch.setattr(preemption, "_ask_workers_to_stop", asked.append)
    with pytest.raises(TrainingStopped, match="the same command resumes run runs/x from it"):
        with saving_on_sigterm("run1234", grace_s=0.5, run="runs/x") as sigterm:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            assert sigterm.received  # and the block goes on: the workers save, then return
    assert asked == ["run1234"]
    with pytest.raises(SystemExit) as ended:  # they do not return within the grace
        with saving_on_sigterm("run5678", grace_s=0.3):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(3)
    assert ended.value.code == 143


def test_a_stop_asked_by_the_driver_is_read_by_rank_0_only(monkeypatch):
    import ray.experimental.internal_kv as kv

    store = {preemption.stop_key("r1"): b"the driver (pid 1 on h) got SIGTERM"}
    monkeypatch.setattr(kv, "_internal_kv_get", lambda key, namespace=None: store.get(key))
    assert preemption.DriverStopNotices("r1", rank=1)() == []
    rank0 = preemption.DriverStopNotices("r1", rank=0)
    assert rank0() == [Notice("driver", "the driver (pid 1 on h) got SIGTERM", stop=True)]
    assert rank0() == []  # once
    assert preemption.stopped_by_driver([Notice("driver", "x", stop=True)])  # the workers return
    assert not preemption.stopped_by_driver([Notice("sigterm", "x", stop=True)])  # Ray restarts them
    assert preemption.DriverStopNotices("another run", rank=0)() == []
