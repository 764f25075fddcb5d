"""Input checks of ms_deform_attn and MSDeformAttn. Each raises a ValueError that names
the tensor, the expected shape/dtype/device and what came instead.

They stay cheap: shapes, dtypes and devices only, plus the values of spatial_shapes and
level_start_index when those live on the CPU (a handful of integers). When they live on
a GPU, reading them would stall the stream on every call, so the token count is not
checked there; and under torch.compile value checks are skipped (shapes are still
checked, once per compiled graph)."""
from __future__ import annotations

import torch
from torch import Tensor


def _fail(who: str, message: str) -> None:
    raise ValueError(f"{who}: {message}")


def _shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def check_rank(who: str, name: str, tensor: Tensor, layout: str) -> None:
    """`layout` is the expected shape in words, e.g. "[N, S, M, D]"."""
    if tensor.dim() != layout.count(",") + 1:
        _fail(who, f"{name} must be {layout}, got shape {_shape(tensor)}")


def check_floating(who: str, name: str, tensor: Tensor) -> None:
    if not tensor.is_floating_point():
        _fail(who, f"{name} must be a floating-point tensor, got {tensor.dtype}")


def check_same_device(who: str, tensors: dict[str, Tensor | None]) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        _fail(who, f"all inputs must be on one device, got {listing}")


def check_levels(who: str, spatial_shapes: Tensor, level_start_index: Tensor, n_levels: int,
                 device: torch.device, shapes_name: str = "spatial_shapes",
                 index_name: str = "level_start_index", levels_label: str = "L") -> None:
    """spatial_shapes [n_levels, 2] and level_start_index [n_levels], integer, on `device`
    or on the CPU (where the kernels' wrapper copies them from); or n_levels (H, W) pairs
    (ops/levels.py)."""
    if not torch.is_tensor(spatial_shapes):
        if len(spatial_shapes) != n_levels or any(len(pair) != 2 for pair in spatial_shapes):
            _fail(who, f"{shapes_name} must be {levels_label}={n_levels} (H, W) pairs, got {list(spatial_shapes)}")
        return
    if spatial_shapes.dim() != 2 or _shape(spatial_shapes) != (n_levels, 2):
        _fail(who, f"{shapes_name} must be [{levels_label}={n_levels}, 2] (H, W per level), "
                   f"got shape {_shape(spatial_shapes)}")
    if _shape(level_start_index) != (n_levels,):
        _fail(who, f"{index_name} must be [{levels_label}={n_levels}], got shape {_shape(level_start_index)}")
    for name, tensor in ((shapes_name, spatial_shapes), (index_name, level_start_index)):
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            _fail(who, f"{name} must be an integer tensor (int64), got {tensor.dtype}")
        if tensor.device != device and tensor.device.type != "cpu":
            _fail(who, f"{name} must be on {device} (or the CPU), got {tensor.device}")


def check_token_count(who: str, tokens_name: str, n_tokens: int, spatial_shapes: Tensor,
                      level_start_index: Tensor, shapes_name: str = "spatial_shapes",
                      index_name: str = "level_start_index") -> None:
    """sum(H*W) == n_tokens and level_start_index == the running sum of H*W, when the
    numbers can be read for free (CPU tensors, eager mode)."""
    if torch.compiler.is_compiling() or not torch.is_tensor(spatial_shapes) or spatial_shapes.device.type != "cpu":
        return
    shapes = spatial_shapes.tolist()
    if any(h < 0 or w < 0 or h * w >= 2**31 for h, w in shapes):
        _fail(who, f"{shapes_name} must hold non-negative (H, W) with H*W < 2**31, got {shapes}")
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != n_tokens:
        _fail(who, f"{tokens_name} has {n_tokens} tokens but {shapes_name} sums to {sum(sizes)} (H*W over levels)")
    if level_start_index.device.type == "cpu":
        expected = [sum(sizes[:level]) for level in range(len(sizes))]
        if level_start_index.tolist() != expected:
            _fail(who, f"{index_name} must be where each level starts, {expected} for {shapes_name} {shapes}, "
                       f"got {level_start_index.tolist()}")


def check_ms_deform_attn_inputs(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                                sampling_locations: Tensor, attention_weights: Tensor) -> None:
    who = "ms_deform_attn"
    check_rank(who, "value", value, "[N, S, M, D]")
    check_rank(who, "sampling_locations", sampling_locations, "[N, Lq, M, L, P, 2]")
    check_rank(who, "attention_weights", attention_weights, "[N, Lq, M, L, P]")
    n, n_tokens, heads, _ = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    if _shape(sampling_locations) != (n, queries, heads, levels, points, 2):
        _fail(who, f"sampling_locations must be [N={n}, Lq, M={heads}, L, P, 2] (N and M from value "
                   f"{_shape(value)}), got shape {_shape(sampling_locations)}")
    if _shape(attention_weights) != (n, queries, heads, levels, points):
        _fail(who, f"attention_weights must be [N, Lq, M, L, P] = {(n, queries, heads, levels, points)} "
                   f"(from sampling_locations), got shape {_shape(attention_weights)}")
    for name, tensor in (("value", value), ("sampling_locations", sampling_locations),
                         ("attention_weights", attention_weights)):
        check_floating(who, name, tensor)
    check_same_device(who, {"value": value, "sampling_locations": sampling_locations,
                            "attention_weights": attention_weights})
    check_levels(who, spatial_shapes, level_start_index, levels, value.device)
    check_token_count(who, "value", n_tokens, spatial_shapes, level_start_index)
