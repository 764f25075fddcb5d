"""Padding changes nothing it should not: given the same features inside the image, the
predictions (relative to the unpadded image) do not depend on how much padding surrounds it
or what the padded area holds. This exercises the valid ratios, the normalised position
encoding, the masked attention values and the two-stage proposals.

(The complete model is not exactly padding-invariant, in the official code neither: the
backbone's convolutions and input_proj's GroupNorm see the padded area.)"""
from __future__ import annotations

import pytest
import torch

from ddetr_dist.models import build_model

from .conftest import VARIANT_NAMES, small_config


def pad_features(model, srcs, pad_h: int, pad_w: int):
    """Each level's maps surrounded by `pad` rows/columns of noise, with matching masks."""
    padded_srcs, masks, pos = [], [], []
    for src in srcs:
        b, c, h, w = src.shape
        big = torch.randn(b, c, h + pad_h, w + pad_w) * 5
        big[..., :h, :w] = src
        mask = torch.ones(b, h + pad_h, w + pad_w, dtype=torch.bool)
        mask[:, :h, :w] = False
        padded_srcs.append(big)
        masks.append(mask)
        pos.append(model.backbone[1](mask))
    return padded_srcs, masks, pos


@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("seed", [0, 3])
def test_predictions_do_not_depend_on_padding(variant, seed):
    torch.manual_seed(seed)
    model = build_model(small_config(), variant)[0].eval()
    with torch.no_grad():
        # generic weights: the official init makes the untrained boxes independent of the image
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        image = torch.randn(1, 3, 64, 96)
        srcs, masks, pos = model.multi_scale_features(image, torch.zeros(1, 64, 96, dtype=torch.bool))
        reference = model.detect(srcs, masks, pos)
        for pad_h, pad_w in [(3, 2), (0, 5)]:  # not stride-aligned: valid ratios are fractional
            padded = model.detect(*pad_features(model, srcs, pad_h, pad_w))
            torch.testing.assert_close(padded["pred_boxes"], reference["pred_boxes"], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(padded["pred_logits"], reference["pred_logits"], atol=1e-5, rtol=1e-4)
            for a, b in zip(padded["aux_outputs"], reference["aux_outputs"]):
                torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], atol=1e-5, rtol=1e-4)


def test_padding_mask_is_used():
    """The same pixels with and without a mask over the right half give different outputs."""
    torch.manual_seed(0)
    model = build_model(small_config())[0].eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        images = torch.randn(1, 3, 64, 128)
        mask = torch.zeros(1, 64, 128, dtype=torch.bool)
        unmasked = model(images, mask)
        mask[:, :, 64:] = True
        masked = model(images, mask)
    assert (unmasked["pred_boxes"] - masked["pred_boxes"]).abs().max() > 1e-3


def test_batched_image_matches_single_image_with_same_features():
    """A batch of a small and a large image: the small one's predictions equal those it
    gets alone, when its features are the same (the per-image valid ratios at work)."""
    torch.manual_seed(1)
    model = build_model(small_config(), "box_refine")[0].eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        small_srcs, small_masks, small_pos = model.multi_scale_features(
            torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
        big_srcs, _, _ = model.multi_scale_features(torch.randn(1, 3, 128, 96),
                                                    torch.zeros(1, 128, 96, dtype=torch.bool))
        srcs, masks = [], []
        for s, b in zip(small_srcs, big_srcs):
            batch = torch.cat([torch.zeros_like(b), b])
            batch[0, :, :s.shape[-2], :s.shape[-1]] = s[0]
            mask = torch.zeros(2, *b.shape[-2:], dtype=torch.bool)
            mask[0] = True
            mask[0, :s.shape[-2], :s.shape[-1]] = False
            srcs.append(batch)
            masks.append(mask)
        batched = model.detect(srcs, masks, [model.backbone[1](m) for m in masks])
        alone = model.detect(small_srcs, small_masks, small_pos)
    torch.testing.assert_close(batched["pred_boxes"][:1], alone["pred_boxes"], atol=1e-5, rtol=1e-4)
