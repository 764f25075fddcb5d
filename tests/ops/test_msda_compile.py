"""The op under torch.compile: registered as torch.library custom ops with fake
(meta) kernels and autograd, so a compiled function calling it traces as one graph and
matches eager, forward and backward."""
from __future__ import annotations

import pytest
import torch

from msda_cases import DIFFERENTIABLE, make_inputs, with_grad
from ddetr_dist.ops import ms_deform_attn
from ddetr_dist.ops.compiled import ms_deform_attn_compiled, ms_deform_attn_compiled_backward


def attention_then_mlp(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    out = ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                         backend="cpu")
    return torch.nn.functional.gelu(out * 2 + 1).sum(-1)


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compiled_function_matches_eager(compile_backend):
    torch._dynamo.reset()
    inputs = make_inputs(2, 6, 2, 8, ((5, 6), (3, 3)), 3, torch.float32, seed=21)
    eager, compiled = with_grad(inputs), with_grad(inputs)
    expected = attention_then_mlp(**eager)
    expected.sum().backward()
    # fullgraph: the checks and the backend choice must trace without a graph break
    fn = torch.compile(attention_then_mlp, backend=compile_backend, fullgraph=True)
    out = fn(**compiled)
    out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for name in DIFFERENTIABLE:
        torch.testing.assert_close(compiled[name].grad, eager[name].grad, rtol=1e-6, atol=1e-6, msg=name)


def test_custom_op_registrations_pass_opcheck():
    inputs = make_inputs(1, 3, 2, 4, ((3, 4), (2, 2)), 2, torch.float64, seed=22)
    args = tuple(inputs.values())
    torch.library.opcheck(ms_deform_attn_compiled, tuple(with_grad(inputs).values()))
    grad = torch.randn(1, 3, 8, dtype=torch.float64)
    torch.library.opcheck(ms_deform_attn_compiled_backward, (grad, *args))
