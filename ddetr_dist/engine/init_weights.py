"""Where a new run's weights start, and how many classes its heads have.

`model.init_checkpoint` (fine-tuning) names a released `{'model': state_dict}` checkpoint, a
`model_final.pth`, a run directory (its newest checkpoint) or one checkpoint folder
(`resolve_weights` reads all four). It is loaded strictly, except class heads of another
number of classes, which are re-initialised; the run's metrics record where its weights
came from. A resumed run takes its own checkpoint's weights instead.

`model.num_classes: auto` is resolved by the driver before any worker starts; a Trainer run
without it (`ddetr bench train`, tests) resolves it here, from the same train manifest.
"""
from __future__ import annotations

import logging
import os
import socket

from torch import nn

from ddetr_dist import comm
from ddetr_dist.config import AUTO, Config, with_num_classes
from ddetr_dist.data import load_shard_set
from ddetr_dist.engine.inference import resolve_weights
from ddetr_dist.engine.metrics import MetricsLog
from ddetr_dist.errors import InputNotFoundError
from ddetr_dist.models import load_official_checkpoint

log = logging.getLogger("ddetr_dist.train")


def classes_in_train_data(cfg: Config) -> int:
    """The train manifest's max category id + 1: the class heads its labels need."""
    d = cfg.data
    return load_shard_set(d.train_shards, d.allow_pipe_urls, d.train_manifest).num_classes


def with_classes_of_data(cfg: Config) -> Config:
    """`cfg` with model.num_classes 'auto' replaced by the train manifest's max category id + 1."""
    if cfg.model.num_classes != AUTO:
        return cfg
    return with_num_classes(cfg, classes_in_train_data(cfg))


def load_init_checkpoint(cfg: Config, model: nn.Module, resuming: bool, metrics: MetricsLog) -> None:
    """`model.init_checkpoint` into `model` (on every rank, before DeepSpeed wraps it), for a
    new run; the `init_checkpoint` event names the file and the re-initialised tensors."""
    path = cfg.model.init_checkpoint
    if not path:
        return
    if resuming:
        if comm.get_rank() == 0:
            log.info("resuming: the weights come from the run's own checkpoint; model.init_checkpoint (%s) is "
                     "not read", path)
        return
    try:
        weights, _ = resolve_weights(path)
    except FileNotFoundError as e:  # a restart on this node would not find it either
        raise InputNotFoundError(f"config key 'model.init_checkpoint' = {path!r}: {e}, on node "
                                 f"{socket.gethostname()} (in {os.getcwd()}). On a cluster, every node needs it at "
                                 "that path (a shared file system)") from None
    reinitialised = load_official_checkpoint(weights, model)
    metrics.emit({"event": "init_checkpoint", "step": 0, "epoch": 0, "from": str(weights),
                  "reinitialised": reinitialised})
