"""The levels' shapes as a list of (H, W) pairs (what an exported graph carries, ops/levels.py)
give what the [L, 2] tensor gives, through every backend and the layer; a wrong count is
named."""
from __future__ import annotations

import pytest
import torch

from ddetr_dist.ops import MSDeformAttn, ms_deform_attn, ms_deform_attn_torch
from ddetr_dist.ops.levels import level_shapes, level_starts

from msda_cases import make_inputs

SHAPES = [(6, 4), (3, 5)]


def test_level_helpers_read_both_forms():
    inputs = make_inputs(shapes=SHAPES)
    assert level_shapes(inputs["spatial_shapes"]) == SHAPES == level_shapes(SHAPES)
    assert level_starts(SHAPES) == inputs["level_start_index"].tolist() == [0, 24]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_list_of_pairs_gives_what_the_tensor_gives(backend):
    inputs = make_inputs(shapes=SHAPES, dtype=torch.float32)
    from_tensor = ms_deform_attn(**inputs, backend=backend)
    from_list = ms_deform_attn(**{**inputs, "spatial_shapes": SHAPES, "level_start_index": level_starts(SHAPES)},
                               backend=backend)
    assert torch.equal(from_list, from_tensor)
    reference = ms_deform_attn_torch(**{**inputs, "spatial_shapes": SHAPES})
    assert torch.allclose(reference, from_tensor, atol=1e-6)


def test_the_layer_takes_a_list_of_pairs():
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2, backend="torch")
    tokens = sum(h * w for h, w in SHAPES)
    query, value = torch.randn(2, 5, 16), torch.randn(2, tokens, 16)
    points = torch.rand(2, 5, 2, 2)
    spatial_shapes = torch.tensor(SHAPES)
    start_index = torch.tensor(level_starts(SHAPES))
    expected = layer(query, points, value, spatial_shapes, start_index)
    assert torch.equal(layer(query, points, value, SHAPES, level_starts(SHAPES)), expected)
    with pytest.raises(ValueError, match=r"input_spatial_shapes must be n_levels=2 \(H, W\) pairs"):
        layer(query, points, value, SHAPES[:1], [0])
