"""torch.autograd.gradcheck of the compiled CPU backward, in float64, for the three
differentiable inputs. Locations are random (off-map ones included): bilinear sampling is
not differentiable on pixel-centre lines, where finite differences straddle a kink, and
random locations miss those lines almost surely."""
from __future__ import annotations

import pytest
import torch

from msda_cases import make_inputs
from ddetr_dist.ops import ms_deform_attn


@pytest.mark.parametrize("wrt", ["value", "sampling_locations", "attention_weights"])
@pytest.mark.parametrize("channels", [3, 17])
def test_gradcheck(wrt, channels):
    inputs = make_inputs(2, 3, 2, channels, ((3, 4), (2, 2)), 2, torch.float64, seed=11)

    def op(tensor):
        return ms_deform_attn(**{**inputs, wrt: tensor}, backend="cpu")

    assert torch.autograd.gradcheck(op, (inputs[wrt].clone().requires_grad_(),), eps=1e-6, atol=1e-7)


def test_gradcheck_all_inputs_together():
    inputs = make_inputs(1, 3, 2, 5, ((3, 3), (2, 2), (1, 2)), 2, torch.float64, seed=12)
    names = ("value", "sampling_locations", "attention_weights")

    def op(value, sampling_locations, attention_weights):
        return ms_deform_attn(value, inputs["spatial_shapes"], inputs["level_start_index"],
                              sampling_locations, attention_weights, backend="cpu")

    leaves = tuple(inputs[name].clone().requires_grad_() for name in names)
    assert torch.autograd.gradcheck(op, leaves, eps=1e-6, atol=1e-7)
