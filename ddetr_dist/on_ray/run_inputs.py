"""What a run starts from, checked on the driver before any worker starts: the backbone
weights and the init checkpoint exist (and the checkpoint fits the model but for its class
heads), and the number of classes fits the train data ('auto' resolved here).

Files: with a local Ray the workers see this machine's files, from where the command runs:
a missing file fails here. On a cluster we join, the workers' nodes may hold files this one
does not: only a warning (a worker that cannot find it ends the run without retries,
on_ray/worker.py's check_inputs).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from pathlib import Path

from ddetr_dist.config import AUTO, Config, ConfigError, with_num_classes

log = logging.getLogger("ddetr_dist.train")


def _missing(message: str, joining_cluster: bool) -> None:
    if joining_cluster:
        log.warning("%s, on this machine; the workers' nodes may have it", message)
        return
    raise ConfigError(message)


def _relative_to_here(path: str) -> str:
    return "" if Path(path).is_absolute() else f" (relative to {os.getcwd()})"


def check_backbone_weights(cfg: Config, joining_cluster: bool) -> None:
    """`model.backbone_weights` names a file (unless an init checkpoint replaces them)."""
    weights = cfg.model.backbone_weights
    if not weights or cfg.model.init_checkpoint or Path(weights).is_file():
        return
    _missing(f"config key 'model.backbone_weights' = {weights!r}: no such file{_relative_to_here(weights)}. Give a "
             "torchvision ResNet checkpoint (.pth, e.g. https://download.pytorch.org/models/resnet50-0676ba61.pth "
             "for ResNet-50), or '' to train the backbone from scratch (with model.backbone_norm=bn "
             "model.backbone_frozen_stages=0)", joining_cluster)


def check_init_checkpoint(cfg: Config, joining_cluster: bool) -> None:
    """`model.init_checkpoint` is a checkpoint whose weights fit a (meta-device) build of the
    model, its class heads aside: another mismatch names the tensors here rather than in
    every worker."""
    import torch

    from ddetr_dist.engine.inference import resolve_weights
    from ddetr_dist.engine.run_dir import RunDir
    from ddetr_dist.engine.run_store import RunStore
    from ddetr_dist.models.build import build_model
    from ddetr_dist.models.checkpoint import CheckpointMismatchError, class_heads_to_reinitialise, \
        model_state_dict, read_checkpoint

    path = cfg.model.init_checkpoint
    if not path:
        return
    run_dir = RunDir.of(cfg)
    if RunStore(run_dir).newest_checkpoint() is not None:  # a resume takes its own weights
        log.info("resuming %s: model.init_checkpoint (%s) is not read", run_dir, path)
        return
    key = f"config key 'model.init_checkpoint' = {path!r}"
    try:
        weights, _ = resolve_weights(path)
    except FileNotFoundError as e:
        _missing(f"{key}: {e}{_relative_to_here(path)}. Give a released checkpoint (.pth), a model_final.pth, "
                 "a run directory or a checkpoint folder", joining_cluster)
        return
    with torch.device("meta"):
        model = build_model(dataclasses.replace(cfg.model, backbone_weights="", init_checkpoint=""))[0]
    try:
        sd = model_state_dict(read_checkpoint(weights), weights)
        heads = class_heads_to_reinitialise(f"{key} ({weights})", model.state_dict(), sd)
    except CheckpointMismatchError as e:
        raise ConfigError(str(e)) from None
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:  # not a torch checkpoint, or a cut one
        raise ConfigError(f"{key}: cannot read {weights} as a checkpoint: {e}") from None
    log.info("the run starts from %s%s", weights, f"; its class heads ({sd[heads[0]].shape[0]} classes) are "
             f"re-initialised for {cfg.model.num_classes}" if heads else "")


def with_checked_num_classes(cfg: Config) -> Config:
    """`cfg` with model.num_classes fitted to the train manifest: 'auto' becomes its max
    category id + 1 (recorded in the run's config.yaml); fewer fail, far more warn."""
    from ddetr_dist.engine.init_weights import classes_in_train_data

    needed = classes_in_train_data(cfg)
    resolved = with_num_classes(cfg, needed)
    if cfg.model.num_classes == AUTO:
        log.info("model.num_classes=auto: %d (the train manifest's category ids go up to %d)", needed, needed - 1)
    return resolved
