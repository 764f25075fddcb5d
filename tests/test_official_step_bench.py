"""tools/official_step_bench.py's torchvision stand-in, without the official checkout: the
ResNet-50 it gives the official Backbone is torchvision's (the official model's backbone
state dict, key for key and shape for shape, with the stages at strides 8/16/32), and the
stand-in package resolves the imports the official code makes. The benchmark itself is a
development tool that no test runs (it needs a clone of the official repository)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from ddetr_dist.models.resnet import FrozenBatchNorm2d

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "official_step_bench.py"
REFERENCE = REPO / "tests" / "reference" / "official_state_dict_shapes.json"
# models/backbone.py, BackboneBase with return_interm_layers (num_feature_levels > 1)
RETURN_LAYERS = {"layer2": "0", "layer3": "1", "layer4": "2"}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("official_step_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def official_body(bench):
    """What models/backbone.py builds: resnet50(replace_stride_with_dilation=[False, False,
    False], pretrained=..., norm_layer=FrozenBatchNorm2d) inside IntermediateLayerGetter
    (the official FrozenBatchNorm2d has the same four buffers as ours)."""
    resnet = bench.resnet50(replace_stride_with_dilation=[False, False, False], pretrained=True,
                            norm_layer=FrozenBatchNorm2d)
    return bench.IntermediateLayerGetter(resnet, return_layers=RETURN_LAYERS)


def test_backbone_state_dict_is_the_official_one(bench):
    with torch.device("meta"):
        body = official_body(bench)
    ours = [(f"backbone.0.body.{k}", list(v.shape)) for k, v in body.state_dict().items()]
    expected = [(k, v) for k, v in json.loads(REFERENCE.read_text())["base"].items() if k.startswith("backbone.")]
    assert ours == expected


def test_every_norm_layer_is_the_one_passed(bench):
    with torch.device("meta"):
        resnet = bench.resnet50(norm_layer=torch.nn.BatchNorm2d)
    norms = [m for m in resnet.modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert len(norms) == 53 and all(type(m) is torch.nn.BatchNorm2d for m in norms)


def test_intermediate_layers_at_strides_8_16_32(bench):
    body = official_body(bench).eval()
    with torch.no_grad():
        out = body(torch.randn(1, 3, 64, 96))
    assert list(out) == ["0", "1", "2"]
    assert [tuple(x.shape) for x in out.values()] == [(1, 512, 8, 12), (1, 1024, 4, 6), (1, 2048, 2, 3)]


def test_stand_in_resolves_the_official_imports(bench, monkeypatch):
    for name, module in bench.shim_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    torchvision = importlib.import_module("torchvision")
    # util/misc.py: from 0.7 on it imports nothing more from torchvision.ops
    assert float(torchvision.__version__[:3]) >= 0.7
    from torchvision.models._utils import IntermediateLayerGetter  # models/backbone.py
    from torchvision.ops.boxes import box_area  # util/box_ops.py

    assert IntermediateLayerGetter is bench.IntermediateLayerGetter
    assert getattr(torchvision.models, "resnet50") is bench.resnet50
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.5, 2.0]])
    assert box_area(boxes).tolist() == [6.0, 0.5]
