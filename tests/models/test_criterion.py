"""SetCriterion: loss values where they are known, gradient flow, rank averaging, bad input."""
from __future__ import annotations

import pytest
import torch

from ddetr_dist import comm
from ddetr_dist.models import build_model
from ddetr_dist.models.criterion import sigmoid_focal_loss

from .conftest import VARIANT_NAMES, small_config, weighted_loss

TARGETS = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
           {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]


def criterion_for(num_classes: int = 5, **changes):
    return build_model(small_config(num_classes=num_classes, **changes))[1]


def perfect_outputs(queries: int = 6, classes: int = 5) -> dict:
    """Query 2*i+1 of image b predicts target i exactly and confidently; the rest predict background."""
    logits = torch.full((2, queries, classes), -12.0)
    boxes = torch.full((2, queries, 4), 0.1)
    for b, t in enumerate(TARGETS):
        for i, (label, box) in enumerate(zip(t["labels"], t["boxes"])):
            logits[b, 2 * i + 1, label] = 12.0
            boxes[b, 2 * i + 1] = box
    return {"pred_logits": logits, "pred_boxes": boxes}


def test_perfect_predictions_give_near_zero_losses():
    losses = criterion_for()(perfect_outputs(), TARGETS)
    assert losses["loss_bbox"] == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < losses["loss_ce"] < 1e-6
    assert losses["class_error"] == 0
    assert losses["cardinality_error"] == 0


def test_poor_predictions_give_positive_losses():
    outputs = perfect_outputs()
    outputs["pred_boxes"] = outputs["pred_boxes"] + 0.05  # every box a bit off
    outputs["pred_logits"] = -outputs["pred_logits"]  # every class wrong
    losses = criterion_for()(outputs, TARGETS)
    for name in ("loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error"):
        assert losses[name] > 0, name


def test_focal_loss_formula():
    logit, target = torch.tensor([[[0.3]]]), torch.tensor([[[1.0]]])
    p = torch.sigmoid(logit)
    expected = -0.25 * (1 - p) ** 2 * torch.log(p)
    torch.testing.assert_close(sigmoid_focal_loss(logit, target, num_boxes=1), expected.sum())


def test_images_without_objects_train_background_only():
    criterion = criterion_for()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    losses = criterion(perfect_outputs(), empty)
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0
    assert losses["loss_ce"] > 0  # the confident queries are now false positives


def test_num_boxes_is_averaged_over_ranks(monkeypatch):
    outputs = perfect_outputs()
    outputs["pred_boxes"] = outputs["pred_boxes"] + 0.01
    alone = criterion_for()(outputs, TARGETS)["loss_bbox"]
    # pretend a second rank holds 9 boxes: the mean is (3 + 9) / 2 = 6 boxes per rank
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "all_reduce_sum", lambda values: [v + 9 for v in values])
    shared = criterion_for()(outputs, TARGETS)["loss_bbox"]
    torch.testing.assert_close(shared, alone * 3 / 6)
    # the train loop passes an accumulation window's mean instead: no collective here
    torch.testing.assert_close(criterion_for()(outputs, TARGETS, num_boxes=1.5)["loss_bbox"], alone * 3 / 1.5)


def test_encoder_outputs_are_matched_class_agnostically():
    outputs = perfect_outputs()
    enc = perfect_outputs()
    # the same queries are confident, but in class 0: "object", for the encoder
    enc["pred_logits"] = torch.full_like(enc["pred_logits"], -12.0)
    enc["pred_logits"][..., 0] = outputs["pred_logits"].amax(-1)
    outputs["enc_outputs"] = enc
    losses = criterion_for()(outputs, TARGETS)
    assert losses["loss_ce_enc"] < 1e-5 and losses["loss_bbox_enc"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_gradients_reach_every_trainable_parameter_and_no_frozen_one(variant, two_image_batch):
    images, mask, targets = two_image_batch
    torch.manual_seed(0)
    model, criterion, _ = build_model(small_config(), variant)
    # The official init zeroes the last box layer and the deformable-attention offset and
    # weight projections, which blocks some gradients at step 0 only (e.g. level_embed).
    # Nudge every weight so that the test checks the wiring, not the init.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    weighted_loss(criterion, criterion(model(images, mask), targets)).backward()

    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("backbone.0.body.conv1", "backbone.0.body.layer1")) for n in frozen)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert not any(b.requires_grad for b in model.backbone.buffers())  # FrozenBatchNorm2d statistics


@pytest.mark.parametrize("target, message", [
    ({"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 1.2, 0.2]])}, r"targets\[0\]\['boxes'\].*0\.\.1"),
    ({"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, float("nan"), 0.2, 0.2]])}, r"\['boxes'\].*NaN"),
    ({"labels": torch.tensor([5]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}, r"\['labels'\].*num_classes=5"),
    ({"labels": torch.tensor([-1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}, r"\['labels'\].*0\.\.4"),
    ({"labels": torch.tensor([1.0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}, r"\['labels'\].*int64"),
    ({"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}, r"\['boxes'\].*\[2,4\]"),
    ({"labels": torch.tensor([1])}, r"\['boxes'\].*missing"),
])
def test_bad_targets_name_the_field(target, message):
    outputs = perfect_outputs()
    with pytest.raises(ValueError, match=message):
        criterion_for()(outputs, [target, TARGETS[1]])


def test_wrong_number_of_targets():
    with pytest.raises(ValueError, match="targets: expected a list of 2"):
        criterion_for()(perfect_outputs(), TARGETS[:1])


@pytest.mark.parametrize("images, mask, message", [
    (torch.randn(3, 32, 32), torch.zeros(3, 32, 32, dtype=torch.bool), r"images: expected a tensor \[B,3,H,W\]"),
    (torch.randn(1, 1, 32, 32), torch.zeros(1, 32, 32, dtype=torch.bool), r"images: expected a tensor \[B,3,H,W\]"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, 32, 32, dtype=torch.bool), "images: .*floating"),
    (torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 48, dtype=torch.bool), r"padding_mask: .*shape \(1, 32, 32\)"),
    (torch.randn(2, 3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.bool), r"padding_mask: .*shape \(2, 32, 32\)"),
    (torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 32), "padding_mask: expected dtype torch.bool"),
])
def test_bad_images_name_the_field(images, mask, message):
    model = build_model(small_config())[0]
    with pytest.raises(ValueError, match=message):
        model(images, mask)


def test_two_stage_with_too_few_tokens_explains():
    model = build_model(small_config(num_queries=50), "two_stage")[0]
    with pytest.raises(ValueError, match="model.num_queries"):
        model(torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.bool))
