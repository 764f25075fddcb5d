"""State dicts equal the official model's, key for key and shape for shape, at full size."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddetr_dist.models import build_model

from .conftest import VARIANT_NAMES

# every key and shape of the official model, per variant (copied from the design card's reference data)
REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "official_state_dict_shapes.json"
# Table 1 of the paper, millions of parameters
PAPER_PARAMS_M = {"base": 40, "box_refine": 41, "two_stage": 41, "single_scale": 34}


@pytest.fixture(scope="module")
def reference_shapes() -> dict:
    return json.loads(REFERENCE.read_text())


def build_on_meta(variant: str):
    with torch.device("meta"):  # names and shapes without allocating or initialising weights
        return build_model(variant=variant)[0]


def test_reference_lists_the_four_variants(reference_shapes):
    assert sorted(reference_shapes) == sorted(VARIANT_NAMES)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_state_dict_matches_official(variant, reference_shapes):
    ours = {k: list(v.shape) for k, v in build_on_meta(variant).state_dict().items()}
    expected = reference_shapes[variant]
    assert [k for k in expected if k not in ours] == [], "missing keys"
    assert [k for k in ours if k not in expected] == [], "unexpected keys"
    assert {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]} == {}, "mis-shaped keys"
    assert list(ours) == list(expected), "same keys, different order"


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_parameter_count_matches_paper(variant):
    model = build_on_meta(variant)
    total = sum(p.numel() for p in model.parameters())
    assert round(total / 1e6) == PAPER_PARAMS_M[variant]


def test_shared_heads_without_refinement_are_one_module():
    model = build_on_meta("base")
    assert all(head is model.class_embed[0] for head in model.class_embed)
    assert all(head is model.bbox_embed[0] for head in model.bbox_embed)
    assert model.transformer.decoder.bbox_embed is None


def test_two_stage_decoder_heads_are_the_model_heads():
    model = build_on_meta("two_stage")
    assert model.transformer.decoder.class_embed is model.class_embed
    assert model.transformer.decoder.bbox_embed is model.bbox_embed
    assert len({id(m) for m in model.class_embed}) == len(model.class_embed) == 7
