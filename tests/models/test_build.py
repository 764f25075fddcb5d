"""build_model: every variant builds, runs forward and backward, and has the right outputs."""
from __future__ import annotations

import math

import pytest
import torch

from ddetr_dist.config import COCO_NUM_CLASSES, Config, LossConfig
from ddetr_dist.models import VARIANTS, build_model
from ddetr_dist.models.deformable_detr import FOCAL_PRIOR_PROB, DeformableDETR

from .conftest import VARIANT_NAMES, small_config, weighted_loss


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_variant_forward_backward_shapes(variant, two_image_batch):
    images, mask, targets = two_image_batch
    cfg = small_config()
    model, criterion, postprocess = build_model(cfg, variant)
    out = model(images, mask)

    batch, queries, classes = 2, cfg.num_queries, cfg.num_classes
    assert out["pred_logits"].shape == (batch, queries, classes)
    assert out["pred_boxes"].shape == (batch, queries, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (batch, queries, classes)
        assert aux["pred_boxes"].shape == (batch, queries, 4)
    if variant == "two_stage":
        # one proposal per encoder token: strides 8, 16, 32 and the extra stride-64 level
        tokens = sum((64 // s) * (64 // s) for s in (8, 16, 32, 64))
        assert out["enc_outputs"]["pred_logits"].shape == (batch, tokens, classes)
        assert out["enc_outputs"]["pred_boxes"].shape == (batch, tokens, 4)
    else:
        assert "enc_outputs" not in out

    losses = criterion(out, targets)
    assert set(criterion.weight_dict) <= set(losses)  # every weighted loss is computed
    total = weighted_loss(criterion, losses)
    assert torch.isfinite(total) and total > 0
    total.backward()
    assert model.input_proj[0][0].weight.grad is not None

    results = postprocess(out, torch.tensor([[480, 640], [300, 400]]))
    assert [r["boxes"].shape for r in results] == [(100, 4), (100, 4)]


def test_aux_loss_off_has_no_aux_outputs(two_image_batch):
    images, mask, _ = two_image_batch
    model, criterion, _ = build_model(small_config(aux_loss=False))
    assert "aux_outputs" not in model(images, mask)
    assert set(criterion.weight_dict) == {"loss_ce", "loss_bbox", "loss_giou"}


def test_weight_dict_has_aux_and_encoder_weights():
    cfg = Config(model=small_config(dec_layers=3), loss=LossConfig(cls_loss_coef=3.0))
    _, criterion, _ = build_model(cfg, "two_stage")
    expected = {f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou") for s in ("", "_0", "_1", "_enc")}
    assert set(criterion.weight_dict) == expected
    assert criterion.weight_dict["loss_ce_enc"] == 3.0


def test_variant_presets_override_cfg_but_keep_sizes():
    model, _, _ = build_model(small_config(num_feature_levels=3), "single_scale")
    assert model.num_feature_levels == 1 and model.transformer.d_model == 64
    model, _, _ = build_model(small_config(), "two_stage")
    assert model.two_stage and model.with_box_refine


def test_unknown_variant_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        build_model(small_config(), "deformable")
    for name in VARIANTS:
        assert name in str(err.value)


def test_build_accepts_config_model_config_and_none():
    model, criterion, _ = build_model(Config(model=small_config(num_classes=7)))
    assert model.class_embed[0].out_features == 7 and criterion.num_classes == 7
    with torch.device("meta"):
        model, _, _ = build_model()
    assert isinstance(model, DeformableDETR) and model.class_embed[0].out_features == COCO_NUM_CLASSES  # official
    with pytest.raises(TypeError, match="cfg must be"):
        build_model({"hidden_dim": 64})


def test_a_model_built_by_hand_needs_a_number_of_classes():
    """'auto' (the config's default) is the train data's: `ddetr train` resolves it; by hand
    there is no data to read it from."""
    with pytest.raises(ValueError, match=r"model.num_classes is 'auto': `ddetr train` resolves it from the train "
                                         r"data.*give a number when building a model by hand"):
        build_model(Config())


@pytest.mark.parametrize("changes, field", [
    ({"hidden_dim": 48}, "model.hidden_dim"),
    ({"hidden_dim": 96, "nheads": 5}, "model.nheads"),
    ({"backbone_depth": 42}, "model.backbone_depth"),
    ({"dec_layers": 0}, "model.dec_layers"),
    ({"two_stage": True, "with_box_refine": False}, "model.with_box_refine"),
])
def test_bad_model_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        build_model(small_config(**changes))


@pytest.mark.parametrize("levels", [2, 3, 5])
def test_any_number_of_feature_levels(levels):
    model, _, _ = build_model(small_config(num_feature_levels=levels))
    assert len(model.input_proj) == levels
    out = model(torch.randn(1, 3, 128, 128), torch.zeros(1, 128, 128, dtype=torch.bool))
    assert out["pred_boxes"].shape == (1, 20, 4)


def test_dilation_halves_the_last_stride():
    model, _, _ = build_model(small_config(dilation=True, num_feature_levels=3))
    assert model.backbone.strides == [8, 16, 16]
    features, _ = model.backbone(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert [f.shape[-1] for f, _ in features] == [8, 4, 4]


def test_activation_checkpointing_recomputes_and_gives_same_gradients(two_image_batch):
    images, mask, targets = two_image_batch
    grads, losses, calls = [], [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, criterion, _ = build_model(small_config(activation_checkpointing=checkpointing))
        counter = []
        # a module inside the layer: recomputation stops once the saved tensors are rebuilt,
        # so the layer's own forward hook would not fire again
        for layer in (model.transformer.encoder.layers[0], model.transformer.decoder.layers[0]):
            layer.linear1.register_forward_hook(lambda *_: counter.append(1))
        loss = weighted_loss(criterion, criterion(model(images, mask), targets))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        calls.append(len(counter))
    assert calls == [2, 4]  # the checkpointed encoder and decoder layers ran again in backward
    torch.testing.assert_close(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_official_initialisation(variant):
    model = build_model(small_config(), variant)[0]
    prior = -math.log((1 - FOCAL_PRIOR_PROB) / FOCAL_PRIOR_PROB)
    for head in model.class_embed:
        torch.testing.assert_close(head.bias, torch.full_like(head.bias, prior))
    for i, box_head in enumerate(model.bbox_embed):
        last = box_head.layers[-1]
        assert not last.weight.any()  # boxes start at the reference points
        size_bias = 0.0 if variant == "two_stage" or (variant == "box_refine" and i > 0) else -2.0
        assert last.bias[2:].tolist() == [size_bias, size_bias]
    for attn in (model.transformer.encoder.layers[0].self_attn, model.transformer.decoder.layers[0].cross_attn):
        assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()
        assert attn.sampling_offsets.bias.abs().max() == attn.n_points  # the official direction grid
