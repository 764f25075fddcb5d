"""ResNet backbone: torchvision layout, frozen stem/layer1, strides, masks; position encoding."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ddetr_dist.models.backbone import Backbone, downsample_mask
from ddetr_dist.models.position_encoding import PositionEmbeddingSine
from ddetr_dist.models.resnet import FrozenBatchNorm2d, ResNet

TORCHVISION_BLOCK_KEYS = {
    18: ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
         "conv2.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var"],
    50: ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
         "conv2.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var",
         "conv3.weight", "bn3.weight", "bn3.bias", "bn3.running_mean", "bn3.running_var"],
}


@pytest.mark.parametrize("depth, blocks, channels", [
    (18, (2, 2, 2, 2), [128, 256, 512]), (34, (3, 4, 6, 3), [128, 256, 512]),
    (50, (3, 4, 6, 3), [512, 1024, 2048]), (101, (3, 4, 23, 3), [512, 1024, 2048])])
def test_resnet_layout(depth, blocks, channels):
    with torch.device("meta"):
        net = ResNet(depth)
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == list(blocks)
    assert net.num_channels == channels
    assert not any(k.startswith("fc.") for k in net.state_dict())
    block_keys = [k[len("layer2.1."):] for k in net.state_dict() if k.startswith("layer2.1.")]
    assert block_keys == TORCHVISION_BLOCK_KEYS[18 if depth < 50 else 50]


def test_frozen_batch_norm_matches_batch_norm_in_eval():
    bn = torch.nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.normal_()
        bn.running_var.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped on load
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(frozen(x), bn(x))
    assert list(frozen.parameters()) == []


def test_stem_and_layer1_frozen_rest_trainable():
    backbone = Backbone(depth=18)
    for name, p in backbone.body.named_parameters():
        assert p.requires_grad == name.startswith(("layer2", "layer3", "layer4")), name


@pytest.mark.parametrize("num_outputs, strides", [(1, [32]), (2, [16, 32]), (3, [8, 16, 32])])
def test_outputs_strides_and_masks(num_outputs, strides):
    backbone = Backbone(depth=18, num_outputs=num_outputs)
    assert backbone.strides == strides
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True  # image 1 is 64 wide, padded to 96
    features = backbone(torch.randn(2, 3, 64, 96), mask)
    assert len(features) == num_outputs
    for (feature, feature_mask), stride, channels in zip(features, strides, backbone.num_channels):
        assert feature.shape == (2, channels, 64 // stride, 96 // stride)
        assert feature_mask.shape == (2, 64 // stride, 96 // stride)
        assert not feature_mask[0].any()
        assert feature_mask[1].sum(1).tolist() == [32 // stride] * (64 // stride)


def test_position_encoding_ignores_padding_and_is_normalised():
    pos_enc = PositionEmbeddingSine(16)
    small = pos_enc(torch.zeros(1, 4, 6, dtype=torch.bool))
    padded_mask = torch.ones(1, 7, 9, dtype=torch.bool)
    padded_mask[:, :4, :6] = False
    padded = pos_enc(padded_mask)
    assert small.shape == (1, 32, 4, 6)
    torch.testing.assert_close(padded[..., :4, :6], small)
    # first channel of y: sin of the normalised row centre (i + 0.5) / H * 2pi
    rows = torch.arange(4, dtype=torch.float32)
    torch.testing.assert_close(small[0, 0, :, 0], torch.sin((rows + 0.5) / (4 + 1e-6) * 2 * math.pi))


def test_downsampled_masks_are_the_official_interpolation_to_the_pixel():
    """downsample_mask writes out torch's nearest arithmetic (so that an exported graph computes
    it, where ONNX Resize would round otherwise): every mask equals F.interpolate's, also at
    sizes whose float scale is inexact (an image 7 wide at a level 3 wide, 1333 at 42)."""
    generator = torch.Generator().manual_seed(0)
    sizes = [((160, 224), (3, 4)), ((7, 7), (3, 3)), ((800, 1333), (25, 42)), ((801, 1201), (101, 151)),
             ((97, 130), (13, 17)), ((5, 9), (10, 18)), ((64, 64), (64, 64))]
    for (height, width), size in sizes:
        mask = torch.rand(2, height, width, generator=generator) > 0.5
        official = F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]
        assert torch.equal(downsample_mask(mask, size), official), (height, width, size)
