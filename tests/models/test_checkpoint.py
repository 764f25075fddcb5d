"""load_official_checkpoint and load_backbone_weights: round trips, mismatches, new classes."""
from __future__ import annotations

import argparse
import logging
import math

import pytest
import torch

from ddetr_dist.models import CheckpointMismatchError, build_model, load_official_checkpoint
from ddetr_dist.models.checkpoint import infer_model_config, load_backbone_weights
from ddetr_dist.models.deformable_detr import FOCAL_PRIOR_PROB

from .conftest import VARIANT_NAMES, small_config


def save_official(model, path, **extra):
    torch.save({"model": model.state_dict(), **extra}, path)


def assert_same_state(a, b, skip=lambda key: False):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if not skip(key):
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("variant", ["box_refine", "two_stage"])
def test_round_trip_through_a_file(tmp_path, variant):
    torch.manual_seed(0)
    source = build_model(small_config(), variant)[0]
    # official training checkpoints also hold an argparse.Namespace and optimizer state
    save_official(source, tmp_path / "ckpt.pth", args=argparse.Namespace(lr=2e-4, with_box_refine=True),
                  epoch=49, optimizer={"state": {}, "param_groups": [{"lr": 2e-4}]})
    torch.manual_seed(1)
    target = build_model(small_config(), variant)[0]
    assert load_official_checkpoint(tmp_path / "ckpt.pth", target) == []
    assert_same_state(source, target)
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(source.eval()(images)["pred_boxes"], target.eval()(images)["pred_boxes"])


def test_mismatch_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    source = build_model(small_config(dim_feedforward=256), "base")[0]
    state = source.state_dict()
    del state["transformer.level_embed"]
    state["transformer.extra.weight"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "ckpt.pth")
    model = build_model(small_config(), "base")[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_official_checkpoint(tmp_path / "ckpt.pth", model)
    message = str(err.value)
    assert "missing keys (1)" in message and "transformer.level_embed" in message
    assert "unexpected keys (1)" in message and "transformer.extra.weight" in message
    assert "mis-shaped keys" in message
    assert "transformer.encoder.layers.0.linear1.weight: (256, 64) vs (128, 64)" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_variant_mismatch_is_reported(tmp_path):
    save_official(build_model(small_config(), "box_refine")[0], tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(\d+\):\n    transformer.decoder.bbox_embed"):
        load_official_checkpoint(tmp_path / "ckpt.pth", build_model(small_config(), "base")[0])


@pytest.mark.parametrize("variant", ["base", "two_stage"])
def test_other_num_classes_reinitialises_only_the_class_heads(tmp_path, variant, caplog):
    torch.manual_seed(0)
    source = build_model(small_config(num_classes=5), variant)[0]
    with torch.no_grad():
        for head in source.class_embed:
            head.bias.fill_(3.0)  # unlike any fresh init
    save_official(source, tmp_path / "ckpt.pth")
    target = build_model(small_config(num_classes=3), variant)[0]
    with caplog.at_level(logging.WARNING):
        reinitialised = load_official_checkpoint(tmp_path / "ckpt.pth", target)
    assert reinitialised and all("class_embed." in k for k in reinitialised)
    assert set(reinitialised) == {k for k in target.state_dict() if "class_embed" in k}
    assert "5 classes" in caplog.text and "re-initialised" in caplog.text
    assert_same_state(source, target, skip=lambda key: "class_embed" in key)
    for head in target.class_embed:
        assert head.out_features == 3
        prior = -math.log((1 - FOCAL_PRIOR_PROB) / FOCAL_PRIOR_PROB)
        torch.testing.assert_close(head.bias, torch.full((3,), prior))


def test_not_a_checkpoint(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match="no state dict"):
        load_official_checkpoint(tmp_path / "bad.pth", build_model(small_config())[0])
    with pytest.raises(FileNotFoundError):
        load_official_checkpoint(tmp_path / "missing.pth", build_model(small_config())[0])


def test_torchvision_backbone_weights_load(tmp_path):
    """A torchvision ResNet state dict: our body's keys plus fc.* and BN counters."""
    torch.manual_seed(0)
    donor = build_model(small_config())[0].backbone[0].body
    state = dict(donor.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    state["bn1.num_batches_tracked"] = torch.tensor(7)
    torch.save(state, tmp_path / "resnet18.pth")
    model = build_model(small_config(backbone_weights=str(tmp_path / "resnet18.pth")))[0]
    assert_same_state(donor, model.backbone[0].body)

    del state["layer4.1.conv2.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointMismatchError, match="layer4.1.conv2.weight"):
        load_backbone_weights(tmp_path / "broken.pth", model)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_config_is_inferred_from_weights(variant):
    cfg = small_config(backbone_depth=34, enc_layers=3, num_queries=17, num_classes=9)
    model = build_model(cfg, variant)[0]
    inferred = infer_model_config(model.state_dict(), base=small_config())
    built = build_model(inferred)[0]
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert (inferred.backbone_depth, inferred.enc_layers, inferred.num_classes) == (34, 3, 9)
