"""The CUDA kernels against the reference and against the CPU kernels (run on a GPU
machine: `make test-gpu`). Geometries cover both CUDA code paths: 16-byte packs with a
shuffle reduction (D=32), one channel per thread with atomics (odd D, misaligned value),
and groups wider than a warp (D=256)."""
from __future__ import annotations

import pytest
import torch

from msda_cases import DIFFERENTIABLE, make_inputs, relative_error, with_grad
from ddetr_dist.ops import ms_deform_attn, ms_deform_attn_torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SHAPES = ((12, 16), (6, 8), (3, 4), (2, 2))
GEOMETRIES = [(2, 9, 8, 32, 4), (1, 5, 3, 71, 2), (2, 4, 2, 256, 3), (3, 6, 1, 30, 1)]
IDS = ["D32", "D71", "D256", "D30"]


def on(inputs: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def misaligned(value: torch.Tensor) -> torch.Tensor:
    """The same values at a storage offset of one element: 16-byte loads are not allowed."""
    storage = torch.empty(value.numel() + 1, dtype=value.dtype, device=value.device)
    view = storage[1:].view(value.shape)
    view.copy_(value)
    return view


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_forward_and_backward_match_reference(geometry, dtype, atol):
    n, queries, heads, channels, points = geometry
    inputs = on(make_inputs(n, queries, heads, channels, SHAPES, points, dtype, borders=True), "cuda")
    ours, theirs = with_grad(inputs), with_grad(inputs)
    out = ms_deform_attn(**ours, backend="cuda")
    ref = ms_deform_attn_torch(**theirs)
    torch.testing.assert_close(out, ref, rtol=atol, atol=atol)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for name in DIFFERENTIABLE:
        torch.testing.assert_close(ours[name].grad, theirs[name].grad, rtol=atol * 10, atol=atol * 10, msg=name)


def test_misaligned_value_takes_the_scalar_path():
    inputs = on(make_inputs(2, 5, 4, 32, SHAPES, 2, torch.float32, seed=3), "cuda")
    shifted = {**inputs, "value": misaligned(inputs["value"])}
    assert shifted["value"].data_ptr() % 16 != 0
    torch.testing.assert_close(ms_deform_attn(**shifted, backend="cuda"), ms_deform_attn_torch(**inputs),
                               rtol=1e-5, atol=1e-5)


def test_cuda_matches_cpu_kernels():
    inputs = make_inputs(2, 20, 8, 32, SHAPES, 4, torch.float32, seed=4)
    cpu, gpu = with_grad(inputs), with_grad(on(inputs, "cuda"))
    grad = torch.randn(2, 20, 256)
    ms_deform_attn(**cpu, backend="cpu").backward(grad)
    out = ms_deform_attn(**gpu, backend="cuda")
    out.backward(grad.cuda())
    torch.testing.assert_close(out.cpu(), ms_deform_attn(**inputs, backend="cpu"), rtol=1e-5, atol=1e-5)
    for name in DIFFERENTIABLE:
        torch.testing.assert_close(gpu[name].grad.cpu(), cpu[name].grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("channels", [4, 5])
def test_gradcheck_on_cuda(channels):
    inputs = on(make_inputs(2, 3, 2, channels, ((3, 4), (2, 2)), 2, torch.float64, seed=5), "cuda")

    def op(value, sampling_locations, attention_weights):
        return ms_deform_attn(value, inputs["spatial_shapes"], inputs["level_start_index"], sampling_locations,
                              attention_weights, backend="cuda")

    leaves = tuple(inputs[name].clone().requires_grad_() for name in DIFFERENTIABLE)
    assert torch.autograd.gradcheck(op, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=["bf16", "f16"])
def test_half_types_close_to_float32(dtype, tolerance):
    full = on(make_inputs(2, 30, 8, 32, SHAPES, 4, torch.float32, seed=6), "cuda")
    full["value"] = full["value"].to(dtype).float()
    half = {**full, "value": full["value"].to(dtype)}
    ours, expected = with_grad(half), with_grad(full)
    out = ms_deform_attn(**ours, backend="cuda")
    ref = ms_deform_attn(**expected, backend="cuda")
    assert out.dtype == dtype
    assert relative_error(out, ref) < tolerance
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad.to(dtype).float())
    assert ours["value"].grad.dtype == dtype and ours["sampling_locations"].grad.dtype == torch.float32
    for name in DIFFERENTIABLE:
        assert relative_error(ours[name].grad, expected[name].grad) < tolerance, name


def test_autocast_bfloat16_on_cuda():
    from ddetr_dist.ops import MSDeformAttn

    layer = MSDeformAttn(d_model=64, n_levels=4, n_heads=4, n_points=4).cuda()
    spatial = on(make_inputs(1, 1, 1, 1, SHAPES, 1), "cuda")
    tokens = int(spatial["spatial_shapes"].prod(1).sum())
    args = (torch.randn(2, 40, 64, device="cuda"), torch.rand(2, 40, 4, 2, device="cuda"),
            torch.randn(2, tokens, 64, device="cuda"), spatial["spatial_shapes"], spatial["level_start_index"])
    expected = layer(*args)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(*args)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and relative_error(out, expected) < 2e-2


def test_compiled_function_on_cuda():
    inputs = on(make_inputs(2, 6, 2, 8, SHAPES, 3, torch.float32, seed=7), "cuda")

    def fn(**kw):
        return ms_deform_attn(**kw, backend="cuda").sin().sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(**inputs), fn(**inputs))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_device_guard_runs_on_the_tensors_gpu():
    inputs = make_inputs(2, 7, 2, 8, SHAPES, 3, torch.float32, seed=8)
    with torch.cuda.device(0):
        on_second = with_grad(on(inputs, "cuda:1"))
        out = ms_deform_attn(**on_second, backend="cuda")
        out.sum().backward()
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out.cpu(), ms_deform_attn(**inputs, backend="cpu"), rtol=1e-5, atol=1e-5)
    assert on_second["value"].grad.device == torch.device("cuda:1")
