"""Notices from outside the run, turned into the engine's `Notice`s (engine/checkpoint_policy.py:
every rank saves at the next step), and SIGTERM handling for the Ray workers and the driver.

- Ray announces that a node of the run will be preempted (it drains the node with a deadline:
  `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N`, what
  the autoscaler does for a spot node). Ray Train's preemption watcher tells every worker;
  the run saves at the next step and goes on. When the deadline passes, Ray Train restarts
  the workers (on the nodes that remain, or a replacement) and they resume from that save.
- SIGTERM to a worker process (a Kubernetes eviction, Slurm's preemption, a spot notice
  turned into SIGTERM): the run saves at the next step, then every worker stops with
  `StopAfterSave`, which Ray Train answers by restarting the workers from that save.
  Within `ray.save_on_sigterm_s`, else the worker exits as Ray's own handler would.
- SIGTERM to the driver (`ddetr train`): it tells the workers through Ray's key-value store;
  they save at the next step and return; the driver exits with 143 and the same command
  resumes from that step. Within `ray.save_on_sigterm_s`, else the driver exits at once
  (its workers go with it).

A second SIGTERM always ends the process at once.
"""
from __future__ import annotations

import _thread
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from typing import Callable, Iterator

from ddetr_dist.engine.checkpoint_policy import Notice, StopAfterSave

log = logging.getLogger("ddetr_dist.train")

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM
KV_NAMESPACE = "ddetr_dist"
KV_POLL_S = 1.0  # rank 0 asks Ray's KV store for the driver's stop at most this often


def stop_key(run_id: str) -> bytes:
    """The key the driver sets to stop the run of `run_id` (new for each `ddetr train`: a
    flag left by the previous driver of a run never stops the next one)."""
    return f"stop/{run_id}".encode()


# ------------------------------------------------------------------ Ray's preemption notice

def preemption_detail(info, now_s: float | None = None) -> str:
    """What a person reads of Ray's `PreemptionInfo`."""
    now_s = time.time() if now_s is None else now_s
    nodes = ", ".join(f"{node[:12]} (ranks {', '.join(map(str, ranks))})"
                      for node, ranks in sorted(info.preempted_node_to_ranks.items()))
    deadline = (f"in {max(0.0, info.deadline_ms / 1000 - now_s):.0f} s" if info.deadline_ms
                else "without a deadline")
    return f"Ray is draining node {nodes} for preemption: it goes away {deadline}"


def local_preemption_info() -> Callable[[], object]:
    """A reader of the preemption info Ray Train's watcher gave this worker (it gives every
    worker the same). Read where the watcher stores it, so that asking costs nothing and is
    no collective; should a later Ray move it, the public `ray.train.get_preemption_info()`,
    a barrier of all workers, which every rank reaches since the loop asks at every step."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        context = get_train_context().preemption_context
        return lambda: context.preemption_info
    except (ImportError, AttributeError):
        import ray.train

        log.warning("this Ray keeps its preemption info elsewhere: asking ray.train.get_preemption_info() each step")
        return ray.train.get_preemption_info


class PreemptionNotices:
    """A Notice for each new preemption Ray announces (a second drained node is new)."""

    def __init__(self, read=None):
        self.read = read or local_preemption_info()
        self.seen = None

    def __call__(self) -> list[Notice]:
        info = self.read()
        if info is None or info == self.seen:
            return []
        self.seen = info
        return [Notice("preemption", preemption_detail(info))]


# ------------------------------------------------------------------ SIGTERM to a worker

class SigtermNotices:
    """SIGTERM to this worker process: one stopping Notice. The handler only sets a flag
    (the loop saves at its next step); if the process still runs `grace_s` later, or at a
    second SIGTERM, the handler that was there before (Ray's: exit) runs."""

    def __init__(self, grace_s: float, rank: int):
        self.grace_s, self.rank = grace_s, rank
        self.received = threading.Event()
        self.reported = False
        self.previous = None
        self.closed = False  # the loop has ended: nothing will save; SIGTERM is Ray's again

    def install(self) -> None:
        """In the main thread (Python runs signal handlers there only)."""
        self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        if self.received.is_set() or self.closed:  # a second SIGTERM, the grace is over, or no loop: as before
            if callable(self.previous):
                self.previous(signum, frame)  # Ray's: SystemExit with its message
            raise SystemExit(SIGTERM_EXIT_CODE)
        self.received.set()
        log.warning("rank %d (pid %d) got SIGTERM: saving a checkpoint at the next step, then stopping "
                    "(at most %g s)", self.rank, os.getpid(), self.grace_s)
        timer = threading.Timer(self.grace_s, _thread.interrupt_main, args=(signal.SIGTERM,))
        timer.daemon = True
        timer.start()

    def __call__(self) -> list[Notice]:
        if not self.received.is_set() or self.reported:
            return []
        self.reported = True
        return [Notice("sigterm", f"rank {self.rank} on {socket.gethostname()} (pid {os.getpid()}) got SIGTERM",
                       stop=True)]


_to_install: list[SigtermNotices] = []  # this process's handler, for its main thread


def _install_in_this_process() -> None:
    _to_install[-1].install()


def install_in_main_thread(handler: SigtermNotices) -> None:
    """Ray Train runs the loop in a thread of the worker actor, whose main thread runs the
    actor's methods: `execute` (Ray Train's own way to run a function on a worker) runs the
    installation there. What it runs goes by reference (a module's function), not as a copy
    of `handler`: the handler of this very process must be installed."""
    import ray

    _to_install[:] = [handler]
    actor = ray.get_runtime_context().current_actor
    ray.get(actor.execute.remote(_install_in_this_process))


# ------------------------------------------------------------------ the driver's stop

class DriverStopNotices:
    """The driver's stop (its SIGTERM), read by rank 0 from Ray's KV store: a stopping Notice."""

    def __init__(self, run_id: str, rank: int):
        self.key, self.rank = stop_key(run_id), rank
        self.next_poll = 0.0
        self.reported = False

    def __call__(self) -> list[Notice]:
        if self.rank != 0 or self.reported or time.monotonic() < self.next_poll:
            return []
        from ray.experimental.internal_kv import _internal_kv_get

        self.next_poll = time.monotonic() + KV_POLL_S
        why = _internal_kv_get(self.key, namespace=KV_NAMESPACE)
        if not why:
            return []
        self.reported = True
        return [Notice("driver", why.decode(), stop=True)]


class WorkerNotices:
    """Every notice source of a Ray Train worker, as one (for `Trainer(notices=...)`).
    `save_on_sigterm_s` 0: SIGTERM stays Ray's (the worker exits at once). `close()` when
    the loop ends: a SIGTERM then (Ray ending the workers) is Ray's again."""

    def __init__(self, run_id: str, rank: int, save_on_sigterm_s: float):
        self.sigterm = SigtermNotices(save_on_sigterm_s, rank) if save_on_sigterm_s > 0 else None
        self.sources: list[Callable[[], list[Notice]]] = [PreemptionNotices(), DriverStopNotices(run_id, rank)]
        if self.sigterm is not None:
            install_in_main_thread(self.sigterm)
            self.sources.append(self.sigterm)

    def __call__(self) -> list[Notice]:
        return [notice for source in self.sources for notice in source()]

    def close(self) -> None:
        if self.sigterm is not None:
            self.sigterm.closed = True


def wait_until_registered(timeout_s: float) -> None:
    """Until Ray Train's controller has registered every checkpoint this worker reported:
    a worker that raises right after its report may otherwise be restarted from the one
    before (the controller reads a failed worker's error before its last report)."""
    import ray.train

    try:
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                               timeout_s=timeout_s)
    except Exception as e:  # noqa: BLE001 - stopping anyway; the restart takes the newest registered one
        log.warning("could not confirm that Ray registered the checkpoint within %g s: %s", timeout_s, e)


def fit_until_stopped(trainer, notices: WorkerNotices) -> None:
    """`trainer.fit()`; after a stop for notices, once Ray has registered the checkpoint:
    return when the driver asked (it ends the run), else raise (Ray Train restarts the
    workers from that checkpoint)."""
    try:
        trainer.fit()
    except StopAfterSave as stop:
        wait_until_registered(timeout_s=trainer.cfg.ray.save_on_sigterm_s)
        if not stopped_by_driver(stop.notices):
            raise
        log.info("%s", stop)
    finally:
        notices.close()


def stopped_by_driver(notices: list[Notice]) -> bool:
    """The run stopped because the driver asked: the workers return (the driver exits); any
    other stop is a failure Ray Train restarts the workers after."""
    return any(n.source == "driver" for n in notices)


# ------------------------------------------------------------------ SIGTERM to the driver

class TrainingStopped(RuntimeError):
    """SIGTERM stopped the run after its workers saved a checkpoint."""


class DriverSigterm:
    """What `saving_on_sigterm` tells the driver: whether SIGTERM came."""

    def __init__(self):
        self.received = False


@contextlib.contextmanager
def saving_on_sigterm(run_id: str, grace_s: float, run: str = "") -> Iterator[DriverSigterm]:
    """While the driver waits for the run: SIGTERM asks the workers (Ray's KV store) to save
    at their next step and stop; they return, and the block raises TrainingStopped (naming
    `run`). Not within `grace_s`, or at a second SIGTERM: SystemExit(143) here, which ends
    the driver and, with it, its workers. In the main thread only (else nothing is installed)."""
    state = DriverSigterm()
    if grace_s <= 0 or threading.current_thread() is not threading.main_thread():
        yield state
        return

    def on_sigterm(signum, frame):
        if state.received:
            log.error("no checkpoint within ray.save_on_sigterm_s=%g s of SIGTERM (or a second SIGTERM): "
                      "stopping now; the run resumes from its newest checkpoint", grace_s)
            raise SystemExit(SIGTERM_EXIT_CODE)
        state.received = True
        log.warning("SIGTERM: asking the workers to save a checkpoint at their next step and stop (at most %g s; "
                    "a second SIGTERM stops at once)", grace_s)
        threading.Thread(target=_ask_workers_to_stop, args=(run_id,), daemon=True).start()
        timer = threading.Timer(grace_s, _thread.interrupt_main, args=(signal.SIGTERM,))
        timer.daemon = True
        timer.start()
        timers.append(timer)

    timers: list[threading.Timer] = []
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield state
    finally:
        for timer in timers:
            timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    if state.received:
        raise TrainingStopped(f"stopped on SIGTERM after saving a checkpoint; the same command resumes run {run} "
                              "from it")


def _ask_workers_to_stop(run_id: str) -> None:
    """In a thread: the signal handler interrupted Ray's own calls in the main thread."""
    from ray.experimental.internal_kv import _internal_kv_put

    why = f"the driver (pid {os.getpid()} on {socket.gethostname()}) got SIGTERM"
    _internal_kv_put(stop_key(run_id), why.encode(), overwrite=True, namespace=KV_NAMESPACE)
