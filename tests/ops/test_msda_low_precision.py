"""bfloat16 / float16 values on the compiled CPU kernels, and MSDeformAttn under
torch.autocast(cpu, bfloat16).

Tolerances (relative error = ||a - b|| / ||b||, against float32 on the same inputs):
  bfloat16: output and grad_value < 1e-2 (8-bit mantissa: each rounding is <= 2^-9 ~ 0.2%)
  float16:  output and grad_value < 2e-3 (11-bit mantissa)
  location and attention gradients: half of that (they are accumulated in float32 from
  rounded values, nothing is rounded after)
The low-precision kernels accumulate in float32, so against the reference computed in
float32 from the same rounded values they agree to the final rounding of the output.
"""
from __future__ import annotations

import pytest
import torch

from msda_cases import DIFFERENTIABLE, make_inputs, relative_error, with_grad
from ddetr_dist.ops import MSDeformAttn, ms_deform_attn, ms_deform_attn_torch

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
SHAPES = ((16, 20), (8, 10), (4, 5), (2, 3))


def half_inputs(dtype: torch.dtype) -> tuple[dict, dict]:
    """(float32 inputs, the same with value in `dtype`; locations and weights stay float32)."""
    full = make_inputs(2, 30, 4, 32, SHAPES, 4, torch.float32, seed=5)
    full["value"] = full["value"].to(dtype).float()  # both runs see the same rounded values
    return full, {**full, "value": full["value"].to(dtype)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_forward_close_to_float32(dtype):
    full, half = half_inputs(dtype)
    out = ms_deform_attn(**half, backend="cpu")
    assert out.dtype == dtype
    expected = ms_deform_attn(**full, backend="cpu")
    assert relative_error(out, expected) < TOLERANCE[dtype]
    # float32 accumulation: only the final rounding separates it from the float32 result
    torch.testing.assert_close(out, expected.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(out, ms_deform_attn_torch(**half), rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_backward_close_to_float32_with_each_input_dtype(dtype):
    full, half = half_inputs(dtype)
    half["sampling_locations"] = half["sampling_locations"].double()  # gradients follow each input's dtype
    grad = torch.randn(2, 30, 4 * 32, generator=torch.Generator().manual_seed(6))
    ours, expected = with_grad(half), with_grad(full)
    ms_deform_attn(**ours, backend="cpu").backward(grad.to(dtype))
    ms_deform_attn(**expected, backend="cpu").backward(grad.to(dtype).float())
    assert ours["value"].grad.dtype == dtype
    assert ours["sampling_locations"].grad.dtype == torch.float64
    assert ours["attention_weights"].grad.dtype == torch.float32
    assert relative_error(ours["value"].grad, expected["value"].grad) < TOLERANCE[dtype]
    for name in ("sampling_locations", "attention_weights"):
        assert relative_error(ours[name].grad, expected[name].grad) < TOLERANCE[dtype] / 2, name


def test_bfloat16_locations_are_read_in_float32():
    # A bfloat16 location is used as given (it cannot be recovered), but it is not rounded
    # again inside: the result equals the float32 run on the same bfloat16-rounded numbers.
    full = make_inputs(1, 6, 2, 8, SHAPES, 2, torch.float32, seed=7)
    rounded = {**full, "sampling_locations": full["sampling_locations"].bfloat16(),
               "attention_weights": full["attention_weights"].bfloat16()}
    out = ms_deform_attn(**rounded, backend="cpu")
    assert out.dtype == torch.float32
    upcast = {**rounded, "sampling_locations": rounded["sampling_locations"].float(),
              "attention_weights": rounded["attention_weights"].float()}
    torch.testing.assert_close(out, ms_deform_attn(**upcast, backend="cpu"), rtol=0, atol=0)


def test_msdeformattn_under_cpu_autocast_bfloat16():
    """Output dtype under autocast is bfloat16 (output_proj is a Linear); forward within
    2e-2 relative of float32, parameter gradients within 5e-2 (bfloat16 Linear layers on
    both sides of the op)."""
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=64, n_levels=4, n_heads=4, n_points=4)
    inputs = make_inputs(2, 1, 1, 1, SHAPES, 1, torch.float32, seed=8)
    tokens = int(inputs["spatial_shapes"].prod(1).sum())
    gen = torch.Generator().manual_seed(9)
    query, flatten = torch.randn(2, 40, 64, generator=gen), torch.randn(2, tokens, 64, generator=gen)
    reference_points = torch.rand(2, 40, 4, 2, generator=gen)
    args = (query, reference_points, flatten, inputs["spatial_shapes"], inputs["level_start_index"])

    expected = layer(*args)
    expected.square().mean().backward()
    expected_grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(*args)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert relative_error(out, expected) < 2e-2
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert relative_error(p.grad, expected_grads[name]) < 5e-2, name


def test_float64_stays_float64():
    inputs = with_grad(make_inputs(1, 3, 2, 4, SHAPES, 2, torch.float64))
    out = ms_deform_attn(**inputs, backend="cpu")
    out.sum().backward()
    assert out.dtype == torch.float64
    assert all(inputs[name].grad.dtype == torch.float64 for name in DIFFERENTIABLE)
