"""Convert between official Deformable DETR checkpoints and ours.

Parameter names and shapes are the same in both; ours adds the model config the weights
belong to, so that a run or `ddetr eval` can rebuild the model from the file alone:

  official  {'model': state_dict, 'optimizer': ..., 'args': ...}
  ours      {'model': state_dict, 'ddetr_dist': {'variant': name | None, 'config': {...}}}

official -> ours infers the model settings from the weights (plus --config / overrides for
what weights cannot tell, e.g. model.nheads), checks every key and shape against a model
built from them, and wraps. ours -> official checks the same way and keeps only 'model'.
The direction is chosen from the source unless --to says otherwise. Writes are atomic.

  ddetr convert-checkpoint r50_deformable_detr-checkpoint.pth ours.pth
  ddetr convert-checkpoint ours.pth official.pth
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from ddetr_dist.atomic import atomic_open
from ddetr_dist.config import ConfigError, ModelConfig, load_config

from .build import build_model, variant_of
from .checkpoint import CheckpointMismatchError, infer_model_config, model_state_dict, read_checkpoint, require_match

METADATA_KEY = "ddetr_dist"
TRAINED_PADDING_KEY = "pad_to_multiple"  # in METADATA_KEY: what the training batches were padded to


def add_arguments(parser) -> None:
    parser.add_argument("src", help="checkpoint to read")
    parser.add_argument("dst", help="checkpoint to write")
    parser.add_argument("--to", choices=("ours", "official"), default=None,
                        help="target format (default: ours for an official file, official for ours)")
    parser.add_argument("--config", default=None,
                        help="YAML config for the settings weights cannot tell (model.nheads, ...)")
    parser.add_argument("overrides", nargs="*", default=[], help="section.key=value config overrides")


def validate(sd: dict, cfg: ModelConfig, src: str) -> None:
    """Build `cfg`'s model without allocating weights and compare keys and shapes."""
    with torch.device("meta"):
        model = build_model(dataclasses.replace(cfg, msda_backend=None))[0]
    require_match(src, model.state_dict(), sd)


def model_config_of(ckpt: dict, sd: dict, base: ModelConfig | None = None) -> ModelConfig:
    """The model a checkpoint holds: our metadata when present, else inferred from the
    shapes (the rest from `base`)."""
    meta = ckpt.get(METADATA_KEY)
    if meta:
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        cfg = dataclasses.replace(base or ModelConfig(), **{k: (tuple(v) if isinstance(v, list) else v)
                                                             for k, v in meta["config"].items() if k in known})
    else:
        cfg = infer_model_config(sd, base)
    # the weights are in the file: rebuilding the model needs neither the ImageNet backbone nor
    # the checkpoint its run started from
    return dataclasses.replace(cfg, backbone_weights="", init_checkpoint="")


def convert(src: str | Path, dst: str | Path, to: str | None = None, base: ModelConfig | None = None) -> str:
    """-> the format written ('ours' or 'official')."""
    ckpt = read_checkpoint(src)
    sd = model_state_dict(ckpt, src)
    meta = ckpt.get(METADATA_KEY)
    to = to or ("official" if meta else "ours")
    cfg = model_config_of(ckpt, sd, base)
    validate(sd, cfg, f"checkpoint {src}")
    if to == "ours":
        out = {"model": sd, METADATA_KEY: {"variant": variant_of(cfg), "config": dataclasses.asdict(cfg)}}
    else:
        out = {"model": sd}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(dst) as f:  # a crash never leaves a half-written checkpoint
        torch.save(out, f)
    return to


def run(args) -> int:
    try:
        base = load_config(args.config, args.overrides).model
        written = convert(args.src, args.dst, args.to, base)
    except (ConfigError, CheckpointMismatchError, FileNotFoundError) as e:
        print(f"ddetr convert-checkpoint: {e}", file=sys.stderr)
        return 1
    print(f"wrote {written} checkpoint {args.dst}")
    return 0
