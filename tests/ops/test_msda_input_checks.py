"""Malformed inputs raise a ValueError that names the tensor and what was expected, in
ms_deform_attn and in the MSDeformAttn layer."""
from __future__ import annotations

import pytest
import torch

from msda_cases import level_tensors, make_inputs
from ddetr_dist.ops import MSDeformAttn, ms_deform_attn

SHAPES = ((6, 4), (3, 5))  # 24 + 15 = 39 tokens


def op_inputs(**changes) -> dict:
    return {**make_inputs(2, 5, 2, 8, SHAPES, 3, torch.float32), **changes}


def test_valid_inputs_pass():
    assert ms_deform_attn(**op_inputs(), backend="cpu").shape == (2, 5, 16)


@pytest.mark.parametrize("changes, message", [
    (lambda x: {"value": x["value"][0]}, r"value must be \[N, S, M, D\], got shape \(39, 2, 8\)"),
    (lambda x: {"sampling_locations": x["sampling_locations"][..., 0]},
     r"sampling_locations must be \[N, Lq, M, L, P, 2\], got shape \(2, 5, 2, 2, 3\)"),
    (lambda x: {"attention_weights": x["attention_weights"][None]}, r"attention_weights must be \[N, Lq, M, L, P\]"),
    (lambda x: {"sampling_locations": x["sampling_locations"][:1]}, r"sampling_locations must be \[N=2, Lq, M=2"),
    (lambda x: {"sampling_locations": x["sampling_locations"][:, :, :1]}, r"sampling_locations must be \[N=2, Lq, M=2"),
    (lambda x: {"sampling_locations": torch.cat([x["sampling_locations"]] * 2, -1)},
     r"sampling_locations must be \[N=2, Lq, M=2, L, P, 2\]"),
    (lambda x: {"attention_weights": x["attention_weights"][..., :2]},
     r"attention_weights must be \[N, Lq, M, L, P\] = \(2, 5, 2, 2, 3\).*got shape \(2, 5, 2, 2, 2\)"),
    (lambda x: {"attention_weights": x["attention_weights"][:, :, :, :1]}, r"attention_weights must be"),
    (lambda x: {"spatial_shapes": x["spatial_shapes"].float()}, r"spatial_shapes must be an integer tensor"),
    (lambda x: {"spatial_shapes": x["spatial_shapes"][:1]}, r"spatial_shapes must be \[L=2, 2\]"),
    (lambda x: {"spatial_shapes": x["spatial_shapes"].flatten()}, r"spatial_shapes must be \[L=2, 2\]"),
    (lambda x: {"level_start_index": x["level_start_index"][:1]}, r"level_start_index must be \[L=2\]"),
    (lambda x: {"level_start_index": x["level_start_index"].double()}, r"level_start_index must be an integer"),
    (lambda x: {"value": x["value"][:, :30]}, r"value has 30 tokens but spatial_shapes sums to 39 \(H\*W over levels\)"),
    (lambda x: {"level_start_index": torch.tensor([0, 20])},
     r"level_start_index must be where each level starts, \[0, 24\].*got \[0, 20\]"),
    (lambda x: {"spatial_shapes": torch.tensor([[-6, -4], [3, 5]])}, r"spatial_shapes must hold non-negative"),
    (lambda x: {"value": x["value"].int()}, r"value must be a floating-point tensor, got torch.int32"),
    (lambda x: {"attention_weights": x["attention_weights"].to("meta")},
     r"all inputs must be on one device, got value on cpu, sampling_locations on cpu, attention_weights on meta"),
    (lambda x: {"spatial_shapes": x["spatial_shapes"].to("meta")}, r"spatial_shapes must be on cpu \(or the CPU\)"),
])
def test_op_rejects(changes, message):
    inputs = op_inputs()
    with pytest.raises(ValueError, match=message):
        ms_deform_attn(**{**inputs, **changes(inputs)}, backend="cpu")


def layer_inputs(d_model=32, n_levels=2, n=2, queries=7, **changes) -> dict:
    spatial_shapes, level_start_index = level_tensors(SHAPES[:n_levels])
    tokens = int(spatial_shapes.prod(1).sum())
    inputs = {"query": torch.randn(n, queries, d_model), "reference_points": torch.rand(n, queries, n_levels, 2),
              "input_flatten": torch.randn(n, tokens, d_model), "input_spatial_shapes": spatial_shapes,
              "input_level_start_index": level_start_index,
              "input_padding_mask": torch.zeros(n, tokens, dtype=torch.bool)}
    return {**inputs, **changes}


@pytest.fixture(scope="module")
def layer():
    return MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)


def test_layer_accepts_valid_inputs(layer):
    assert layer(**layer_inputs()).shape == (2, 7, 32)
    assert layer(**layer_inputs(reference_points=torch.rand(2, 7, 2, 4))).shape == (2, 7, 32)


@pytest.mark.parametrize("changes, message", [
    (lambda x: {"input_flatten": x["input_flatten"][:, :-1], "input_padding_mask": None},
     r"MSDeformAttn: input_flatten has 38 tokens but input_spatial_shapes sums to 39 \(H\*W over levels\)"),
    (lambda x: {"query": x["query"][..., :16]}, r"MSDeformAttn: query must be \[N, Lq, d_model=32\], got shape \(2, 7, 16\)"),
    (lambda x: {"query": x["query"][0]}, r"query must be \[N, Lq, d_model=32\], got shape \(7, 32\)"),
    (lambda x: {"input_flatten": x["input_flatten"][..., :16]}, r"input_flatten must be \[N=2, S, d_model=32\]"),
    (lambda x: {"input_flatten": x["input_flatten"][:1]}, r"input_flatten must be \[N=2, S, d_model=32\] \(N from query\)"),
    (lambda x: {"reference_points": x["reference_points"][..., :1]},
     r"reference_points must be \[N=2, Lq=7, n_levels=2, 2 or 4\]"),
    (lambda x: {"reference_points": x["reference_points"][:, :, :1]}, r"reference_points must be \[N=2, Lq=7, n_levels=2"),
    (lambda x: {"input_spatial_shapes": x["input_spatial_shapes"][:1]},
     r"input_spatial_shapes must be \[n_levels=2, 2\] \(H, W per level\), got shape \(1, 2\)"),
    (lambda x: {"input_spatial_shapes": x["input_spatial_shapes"].float()},
     r"input_spatial_shapes must be an integer tensor \(int64\), got torch.float32"),
    (lambda x: {"input_level_start_index": x["input_level_start_index"][:1]},
     r"input_level_start_index must be \[n_levels=2\]"),
    (lambda x: {"input_padding_mask": x["input_padding_mask"][:, :-1]},
     r"input_padding_mask must be a bool tensor \[N, S\] = \(2, 39\)"),
    (lambda x: {"input_padding_mask": x["input_padding_mask"].float()}, r"input_padding_mask must be a bool tensor"),
    (lambda x: {"query": x["query"].to("meta")}, r"all inputs must be on one device, got query on meta, reference_points on cpu"),
])
def test_layer_rejects(layer, changes, message):
    inputs = layer_inputs()
    with pytest.raises(ValueError, match=message):
        layer(**{**inputs, **changes(inputs)})


def test_layer_rejects_bad_construction():
    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by n_heads \(8\)"):
        MSDeformAttn(d_model=30, n_heads=8)
