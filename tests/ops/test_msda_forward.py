"""The compiled CPU kernels against the pure-PyTorch reference (official math), forward
and backward, across shapes, odd channel counts, 1-4 levels and locations off the map or
exactly on its borders."""
from __future__ import annotations

import pytest
import torch

from msda_cases import DIFFERENTIABLE, make_inputs, with_grad
from ddetr_dist.ops import ms_deform_attn, ms_deform_attn_torch

SHAPES = {
    "1 level": ((7, 5),),
    "2 levels": ((6, 4), (3, 5)),
    "3 levels": ((9, 11), (5, 6), (1, 1)),
    "4 levels": ((12, 16), (6, 8), (3, 4), (2, 2)),
}
# (n, queries, heads, channels, points): odd channel counts exercise the vector tails
GEOMETRIES = [(2, 5, 2, 8, 3), (1, 7, 3, 30, 2), (2, 3, 1, 71, 4), (1, 2, 2, 1025, 1), (3, 4, 8, 32, 4)]


def run_both(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return ms_deform_attn(**inputs, backend="cpu"), ms_deform_attn_torch(**inputs)


@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "N{}-Lq{}-M{}-D{}-P{}".format(*g))
def test_forward_matches_reference_in_float64(shapes, geometry):
    n, queries, heads, channels, points = geometry
    inputs = make_inputs(n, queries, heads, channels, shapes, points, torch.float64, borders=True)
    out, ref = run_both(inputs)
    assert out.shape == (n, queries, heads * channels) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "N{}-Lq{}-M{}-D{}-P{}".format(*g))
def test_forward_matches_reference_in_float32(geometry):
    n, queries, heads, channels, points = geometry
    inputs = make_inputs(n, queries, heads, channels, SHAPES["4 levels"], points, torch.float32, seed=1)
    out, ref = run_both(inputs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_points_off_the_map_read_zero_and_points_on_it_do_not():
    inputs = make_inputs(1, 4, 2, 8, SHAPES["2 levels"], 2, torch.float64)
    far = inputs["sampling_locations"].clone()
    far[..., 0] = -5.0  # every corner of every point far to the left of every map
    assert ms_deform_attn(**{**inputs, "sampling_locations": far}, backend="cpu").abs().max() == 0
    centre = torch.full_like(far, 0.5)
    assert ms_deform_attn(**{**inputs, "sampling_locations": centre}, backend="cpu").abs().min() > 0


@pytest.mark.parametrize("shapes", [SHAPES["1 level"], SHAPES["4 levels"]], ids=["1 level", "4 levels"])
@pytest.mark.parametrize("channels", [8, 71])
def test_backward_matches_reference(shapes, channels):
    inputs = make_inputs(2, 6, 3, channels, shapes, 3, torch.float64, seed=2)
    ours, theirs = with_grad(inputs), with_grad(inputs)
    grad = torch.randn(2, 6, 3 * channels, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ms_deform_attn(**ours, backend="cpu").backward(grad)
    ms_deform_attn_torch(**theirs).backward(grad)
    for name in DIFFERENTIABLE:
        torch.testing.assert_close(ours[name].grad, theirs[name].grad, rtol=0, atol=1e-10, msg=name)


def test_batch_is_not_restricted_by_an_im2col_step():
    # The official kernel needs batch % im2col_step == 0; ours takes any batch.
    inputs = make_inputs(7, 3, 2, 8, SHAPES["2 levels"], 2, torch.float64)
    out, ref = run_both(inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_non_contiguous_inputs():
    inputs = make_inputs(2, 5, 2, 8, SHAPES["2 levels"], 3, torch.float64)
    strided = {**inputs,
               "value": inputs["value"].transpose(0, 1).contiguous().transpose(0, 1),
               "sampling_locations": inputs["sampling_locations"].transpose(1, 2).contiguous().transpose(1, 2)}
    assert not strided["value"].is_contiguous()
    out, ref = run_both(strided)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_empty_queries():
    inputs = make_inputs(2, 0, 2, 8, SHAPES["2 levels"], 3, torch.float64)
    assert ms_deform_attn(**inputs, backend="cpu").shape == (2, 0, 16)


@pytest.mark.parametrize("point_kind", [2, 4], ids=["points", "boxes"])
def test_layer_on_compiled_kernel_matches_layer_on_reference(point_kind):
    from ddetr_dist.ops import MSDeformAttn

    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=48, n_levels=3, n_heads=4, n_points=2).double()
    inputs = make_inputs(2, 1, 1, 1, SHAPES["3 levels"], 1, torch.float64)
    tokens = int(inputs["spatial_shapes"].prod(1).sum())
    gen = torch.Generator().manual_seed(1)
    reference_points = torch.rand(2, 9, 3, point_kind, generator=gen, dtype=torch.float64)
    padding = torch.zeros(2, tokens, dtype=torch.bool)
    padding[1, -20:] = True
    args = (torch.randn(2, 9, 48, generator=gen, dtype=torch.float64), reference_points,
            torch.randn(2, tokens, 48, generator=gen, dtype=torch.float64), inputs["spatial_shapes"],
            inputs["level_start_index"], padding)
    layer.backend = "cpu"
    out = layer(*args)
    layer.backend = "torch"
    torch.testing.assert_close(out, layer(*args), rtol=0, atol=1e-10)
