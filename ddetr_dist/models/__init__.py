"""Deformable DETR in plain PyTorch: `build_model` and `load_official_checkpoint`."""
from .build import VARIANTS, build_model
from .checkpoint import CheckpointMismatchError, load_official_checkpoint

__all__ = ["VARIANTS", "build_model", "load_official_checkpoint", "CheckpointMismatchError"]
