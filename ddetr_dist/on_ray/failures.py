"""Which worker failures Ray Train restarts the run after, and which end it at once.

A worker-group restart (`ray.max_failures`) helps after a lost node or a killed process. It
cannot help when the same config and data fail the same way again: a `NotRetryable` error
(e.g. `NonFiniteLossError` after `train.max_bad_steps`), a `ConfigError`, a checkpoint or
weights file that does not fit the model. Those end the run after one attempt, with their
message.

How: Ray Train V2 (2.60) has no public way to mark an exception non-retryable. Its
`FailureConfig` holds only counts; the controller asks a `FailurePolicy` (retry or raise)
that `DataParallelTrainer.fit()` builds from the `FailureConfig` (`create_failure_policy`)
and hands to the controller actor, with no user hook in between (callbacks can observe a
worker's error, not change the decision). The least invasive way in is the one private
method that receives that policy: `TorchTrainer._initialize_and_run_controller(**kwargs)`,
overridden below to swap in a policy that raises for deterministic errors and asks Ray's
`DefaultFailurePolicy` (unchanged) about everything else. It is local to the trainers we
build (no process-wide patch). Should a later Ray rename that method, runs fall back to
Ray's plain retries; tests/distributed/test_failures.py then fails.
"""
from __future__ import annotations

import logging

from ray.train import WorkerGroupError
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

log = logging.getLogger("ddetr_dist.train")


def worker_exceptions(error: BaseException) -> list[BaseException]:
    """The exceptions the workers raised, from Ray's `WorkerGroupError` (Ray wraps each in
    a `UserExceptionWithTraceback` that keeps the original as `_base_exc`)."""
    failures = getattr(error, "worker_failures", None) or {}
    return [getattr(failure, "_base_exc", failure) for failure in failures.values()]


def is_deterministic(exc: BaseException) -> bool:
    """The same config and data would raise it again on a restart."""
    from ddetr_dist.config import ConfigError
    from ddetr_dist.errors import NotRetryable
    from ddetr_dist.models.checkpoint import CheckpointMismatchError

    # not any FileNotFoundError: a shared file system's hiccup or a checkpoint being rotated
    # away are worth a restart; a missing input is raised as errors.InputNotFoundError
    return isinstance(exc, (NotRetryable, ConfigError, CheckpointMismatchError))


def deterministic_failures(error: BaseException) -> list[BaseException]:
    """The workers' errors in `error` that a restart would meet again (the others, e.g. a
    peer's collective timing out, are what those caused)."""
    if not isinstance(error, WorkerGroupError):
        return []
    return [exc for exc in worker_exceptions(error) if is_deterministic(exc)]


class FailFastPolicy(DefaultFailurePolicy):
    """Ray's default policy, except that a deterministic worker error ends the run at once."""

    def make_decision(self, training_failed_error) -> FailureDecision:
        deterministic = deterministic_failures(training_failed_error)
        if deterministic:
            first = deterministic[0]
            log.error("not retrying (a restart would fail the same way): %s: %s", type(first).__name__, first)
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class FailFastTorchTrainer(TorchTrainer):
    """A TorchTrainer whose controller uses `FailFastPolicy` (see the module's docstring)."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = FailFastPolicy(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
