"""Errors that say what retrying would do.

A worker-group restart (Ray's `ray.max_failures`) helps after a lost node or a killed
process; it cannot help when the same inputs fail the same way again. Such errors derive
from `NotRetryable`: the run ends at once with their message instead of restarting.
"""
from __future__ import annotations


class NotRetryable(RuntimeError):
    """Deterministic: the same config and data fail the same way on every retry."""


class InputNotFoundError(NotRetryable, FileNotFoundError):
    """An input file the config names (e.g. model.backbone_weights) is not where a node
    looks for it: a restart on the same nodes finds it missing again."""


class VersionMismatchError(NotRetryable):
    """A worker's ray, deepspeed or torch differs from the driver's."""
