"""`ddetr export` and `ddetr predict --onnx`: the exported graph takes any batch size and image
size (computing the levels' shapes inside), onnxruntime runs it, and it computes what
PyTorch computes (to 1e-4) at sizes other than the export's and for a padded batch."""
from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddetr_dist.cli import main as ddetr
from ddetr_dist.config import ModelConfig
from ddetr_dist.data.collate import collate
from ddetr_dist.engine.onnx_export import ExportedDetector
from ddetr_dist.models import build_model
from ddetr_dist.models.build import variant_of
from ddetr_dist.models.convert import METADATA_KEY

onnx = pytest.importorskip("onnx", reason="the export extra is part of make setup's test extra")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4
# two-stage with box refinement (the most graph: encoder proposals, top-k, refined boxes),
# four levels (one made by a stride-2 conv), small enough to export in well under a minute
TINY = ModelConfig(backbone_depth=18, hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=32,
                   num_queries=8, num_classes=7, enc_n_points=2, dec_n_points=2, dropout=0.0, with_box_refine=True,
                   two_stage=True)


def save_checkpoint(cfg: ModelConfig, path, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg)[0].eval()
    torch.save({"model": model.state_dict(),
                METADATA_KEY: {"variant": variant_of(cfg), "config": dataclasses.asdict(cfg)}}, path)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(the PyTorch model, its checkpoint, its ONNX file with the detection outputs)."""
    folder = tmp_path_factory.mktemp("export")
    model = save_checkpoint(TINY, folder / "tiny.pth")
    out = folder / "tiny.onnx"
    code = ddetr(["export", "--checkpoint", str(folder / "tiny.pth"), "--out", str(out), "--detections"])
    assert code == 0 and out.is_file()
    return model, folder / "tiny.pth", out


def run_both(model, path, images, padding_mask, orig_sizes):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy(), "padding_mask": padding_mask.numpy(),
                             "orig_sizes": orig_sizes.numpy()})
    with torch.no_grad():
        expected = ExportedDetector(model, detections=True).eval()(images, padding_mask, orig_sizes)
    return got, expected


def largest(got, expected) -> float:
    """logits, boxes and the (sorted) scores; labels and pixel boxes follow the scores' order."""
    return max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got[:3], expected[:3]))


def test_the_graph_has_dynamic_batch_height_and_width_and_no_custom_operator(exported):
    graph = onnx.load(str(exported[2])).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["images"] == ["batch", 3, "height", "width"]
    assert dims["padding_mask"] == ["batch", "height", "width"]
    ops = {node.op_type for node in graph.node}
    domains = {node.domain for node in graph.node}
    assert "GridSample" in ops and domains <= {"", "ai.onnx"}


@pytest.mark.parametrize("batch, height, width", [(1, 97, 130), (3, 160, 224), (2, 301, 200)])
def test_onnxruntime_equals_pytorch_at_sizes_other_than_the_export_one(exported, batch, height, width):
    model, _, path = exported
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height))
    padding_mask = torch.zeros(batch, height, width, dtype=torch.bool)
    got, expected = run_both(model, path, images, padding_mask, torch.tensor([[height, width]] * batch))
    assert got[0].shape == (batch, TINY.num_queries, TINY.num_classes)
    assert largest(got, expected) < TOLERANCE


def test_onnxruntime_equals_pytorch_on_a_padded_batch_of_two_sizes(exported):
    model, _, path = exported
    generator = torch.Generator().manual_seed(1)
    samples = [(torch.randn(3, 150, 200, generator=generator), {}), (torch.randn(3, 230, 120, generator=generator), {})]
    images, padding_mask, _ = collate(samples)
    assert padding_mask[0].any() and padding_mask[1].any()  # each image padded along another side
    got, expected = run_both(model, path, images, padding_mask, torch.tensor([[150, 200], [230, 120]]))
    assert largest(got, expected) < TOLERANCE


def matched(onnx_detections: list[dict], torch_detections: list[dict]) -> bool:
    """One to one: the same label, scores within 1e-3 and boxes within 0.2 px (printed to 0.1)."""
    left = list(torch_detections)
    for d in onnx_detections:
        same = [t for t in left if t["label"] == d["label"] and abs(t["score"] - d["score"]) <= 1e-3
                and max(abs(a - b) for a, b in zip(t["bbox"], d["bbox"])) <= 0.2]
        if not same:
            return False
        left.remove(same[0])
    return not left


def test_predict_with_onnx_gives_the_pytorch_detections(exported, tmp_path):
    _, checkpoint, path = exported
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(200, 150), (120, 260)]):
        pixels = (rng.random((h, w, 3)) * 255).astype("uint8")
        pixels[20:80, 30:90] = (250, 20, 20)
        Image.fromarray(pixels).save(tmp_path / f"image{i}.png")
    common = [str(tmp_path / "image0.png"), str(tmp_path / "image1.png"), "--threshold", "0.02", "data.val_scale=128"]
    assert ddetr(["predict", *common, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "torch")]) == 0
    assert ddetr(["predict", *common, "--onnx", str(path), "--out", str(tmp_path / "onnx")]) == 0
    for i in range(2):
        by_torch = json.loads((tmp_path / "torch" / f"image{i}.json").read_text())["detections"]
        by_onnx = json.loads((tmp_path / "onnx" / f"image{i}.json").read_text())["detections"]
        assert by_torch and matched(by_onnx, by_torch)


def test_predict_with_onnx_refuses_an_image_below_the_smallest_side(exported, tmp_path, capsys):
    Image.new("RGB", (90, 60)).save(tmp_path / "small.png")
    code = ddetr(["predict", str(tmp_path / "small.png"), "--onnx", str(exported[2]), "--out", str(tmp_path / "out"),
                  "data.val_scale=40"])
    assert code == 1 and "height and width >= 65" in capsys.readouterr().err


def test_an_opset_without_grid_sample_is_refused(exported, tmp_path, capsys):
    code = ddetr(["export", "--checkpoint", str(exported[1]), "--out", str(tmp_path / "m.onnx"), "--opset", "15"])
    assert code == 2 and "GridSample" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


def test_predict_with_onnx_without_onnxruntime_says_what_to_install(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as when not installed
    code = ddetr(["predict", str(tmp_path), "--onnx", str(exported[2])])
    assert code == 2 and "pip install 'ddetr_dist[export]'" in capsys.readouterr().err


def test_the_base_r50_model_exports_and_equals_pytorch(tmp_path):
    """The released model's shape: ResNet-50, 6 + 6 layers, 300 queries, 91 classes."""
    model = save_checkpoint(ModelConfig(num_classes=91), tmp_path / "r50.pth")
    out = tmp_path / "r50.onnx"
    assert ddetr(["export", "--checkpoint", str(tmp_path / "r50.pth"), "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(2)
    images, padding_mask, _ = collate([(torch.randn(3, 320, 416, generator=generator), {}),
                                       (torch.randn(3, 352, 288, generator=generator), {})])
    logits, boxes = session.run(None, {"images": images.numpy(), "padding_mask": padding_mask.numpy()})
    with torch.no_grad():
        expected = model(images, padding_mask)
    assert logits.shape == (2, 300, 91)
    assert np.abs(logits - expected["pred_logits"].numpy()).max() < TOLERANCE
    assert np.abs(boxes - expected["pred_boxes"].numpy()).max() < TOLERANCE


def test_an_export_whose_sizes_came_out_fixed_is_refused():
    """torch.onnx.export falls back to the example's fixed sizes, without an error, when the
    model reads a size as a plain number; export_onnx refuses such a graph."""
    from ddetr_dist.engine.onnx_export import check_dynamic, quiet_exporter

    class ReadsTheHeight(torch.nn.Module):
        def forward(self, images, padding_mask):
            return images.mean((2, 3)) * int(images.shape[2]), padding_mask.sum((1, 2))

    batch, height, width = (torch.export.Dim(name, min=2) for name in ("batch", "height", "width"))
    with quiet_exporter():
        program = torch.onnx.export(
            ReadsTheHeight(), (torch.randn(2, 3, 192, 256), torch.zeros(2, 192, 256, dtype=torch.bool)), dynamo=True,
            input_names=["images", "padding_mask"], dynamic_shapes={"images": {0: batch, 2: height, 3: width},
                                                                    "padding_mask": {0: batch, 1: height, 2: width}})
    with pytest.raises(RuntimeError, match=r"images\[2\] = 192.*one image size only"):
        check_dynamic(program)
