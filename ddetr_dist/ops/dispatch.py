"""Backend choice for ms_deform_attn. (Placeholder: only the torch reference so far;
the compiled CPU/CUDA backends replace this.)"""
from __future__ import annotations

import torch

from .reference import ms_deform_attn_torch


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, backend: str | None = None) -> torch.Tensor:
    return ms_deform_attn_torch(value, spatial_shapes, level_start_index,
                                sampling_locations, attention_weights)
