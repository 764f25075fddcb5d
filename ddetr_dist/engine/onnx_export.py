"""A trained detector as one ONNX file (`ddetr export`), and its check against PyTorch.

The graph's inputs are a batch of normalised images [B,3,H,W] and its padding mask [B,H,W]
(True = padding), with batch, height and width dynamic: the levels' sizes, start indexes
and reference points are computed in the graph from the input's shape (ops/levels.py), and
the deformable attention is the grid_sample formulation (ops/reference.py: ONNX GridSample,
opset >= 16), which every ONNX runtime executes; no custom operator. Outputs: `logits`
[B,Q,C] and `boxes` [B,Q,4] (cx, cy, w, h in 0..1 of each image's unpadded part); with
detections, a third input `orig_sizes` [B,2] (h, w) and the top-100 per image: `scores`,
`labels`, `boxes_xyxy` (pixels of orig_sizes), as models/postprocess.py computes them.

The file carries what `ddetr predict --onnx` needs besides the graph (ONNX metadata): the
config (its data section: the val transform), the category names and the smallest side.
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ddetr_dist.atomic import atomic_write_bytes
from ddetr_dist.config import Config, config_to_yaml
from ddetr_dist.console import verbose, without_library_prints
from ddetr_dist.models.deformable_detr import DeformableDETR
from ddetr_dist.models.postprocess import PostProcess

MIN_OPSET = 16  # GridSample
DEFAULT_OPSET = 18
INPUTS = ("images", "padding_mask")
OUTPUTS = ("logits", "boxes")
DETECTION_INPUT, DETECTION_OUTPUTS = "orig_sizes", ("scores", "labels", "boxes_xyxy")
CONFIG_KEY, CATEGORIES_KEY, MIN_SIDE_KEY = "ddetr_dist.config", "ddetr_dist.categories", "ddetr_dist.min_side"


class ExportedDetector(nn.Module):
    """The graph `ddetr export` writes: the detector's last-layer outputs as a tuple, and
    optionally the post-processed detections."""

    def __init__(self, model: DeformableDETR, detections: bool = False):
        super().__init__()
        self.model = model
        self.postprocess = PostProcess() if detections else None

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor, orig_sizes: torch.Tensor | None = None):
        out = self.model(images, padding_mask)
        logits, boxes = out["pred_logits"], out["pred_boxes"]
        if self.postprocess is None:
            return logits, boxes
        return (logits, boxes, *self.postprocess.batched(logits, boxes, orig_sizes))


def smallest_side(model: DeformableDETR) -> int:
    """The smallest image height/width the graph takes: the coarsest level must be at least
    2 pixels (a size of 1 is a special case to the exporter, which would freeze it)."""
    strides = model.backbone.strides
    coarsest = strides[-1] * 2 ** (model.num_feature_levels - len(strides))
    return coarsest + 1


def example_inputs(model: DeformableDETR, detections: bool, size: tuple[int, int]) -> tuple:
    """Two images (the second half padding): a batch of 1 would be frozen as a constant."""
    height, width = size
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    padding_mask = torch.zeros(2, height, width, dtype=torch.bool)
    padding_mask[1, :, width // 2:] = True
    images[1, :, :, width // 2:] = 0
    if not detections:
        return images, padding_mask
    return images, padding_mask, torch.tensor([[height, width], [height, width // 2]])


def dynamic_shapes(model: DeformableDETR, detections: bool) -> dict:
    batch = torch.export.Dim("batch", min=1)
    side = smallest_side(model)
    height, width = torch.export.Dim("height", min=side), torch.export.Dim("width", min=side)
    shapes = {"images": {0: batch, 2: height, 3: width}, "padding_mask": {0: batch, 1: height, 2: width}}
    return {**shapes, "orig_sizes": {0: batch}} if detections else shapes


def export_onnx(model: DeformableDETR, out: str | Path, cfg: Config, categories: dict[int, str],
                opset: int = DEFAULT_OPSET, detections: bool = False, example_size: tuple[int, int] = (192, 256)) -> Path:
    """Write `model` (in eval mode) to `out` as one ONNX file, atomically."""
    if opset < MIN_OPSET:
        raise ValueError(f"--opset {opset}: the deformable attention needs GridSample, which ONNX has from opset "
                         f"{MIN_OPSET}; use {MIN_OPSET} or later (default {DEFAULT_OPSET})")
    wrapper = ExportedDetector(model.eval(), detections).eval()
    names = INPUTS + ((DETECTION_INPUT,) if detections else ())
    with torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(
            wrapper, example_inputs(model, detections, example_size), dynamo=True, opset_version=opset,
            input_names=list(names), output_names=list(OUTPUTS + (DETECTION_OUTPUTS if detections else ())),
            dynamic_shapes=dynamic_shapes(model, detections), verbose=False)
    check_dynamic(program)
    program.model.metadata_props.update({CONFIG_KEY: config_to_yaml(cfg), MIN_SIDE_KEY: str(smallest_side(model)),
                                         CATEGORIES_KEY: json.dumps({str(k): v for k, v in categories.items()})})
    import onnx_ir  # the exporter's own graph library (the export extra)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # one file, the graph and the weights (what program.save writes below 2 GB), whole or not at all
    atomic_write_bytes(out, onnx_ir.to_proto(program.model).SerializeToString())
    return out


# the axes that must stay symbols: batch, height, width
DYNAMIC_AXES = {"images": (0, 2, 3), "padding_mask": (0, 1, 2)}


def check_dynamic(program) -> None:
    """torch.onnx.export falls back to the example's fixed shapes, without an error, when
    torch.export cannot keep an axis dynamic (model code that reads a size as a plain
    number): such a file would run at 192x256 only. Refuse it, naming the axes."""
    shapes = {value.name: list(value.shape) for value in program.model.graph.inputs}
    frozen = [f"{name}[{axis}] = {shapes[name][axis]}" for name, axes in DYNAMIC_AXES.items() for axis in axes
              if isinstance(shapes[name][axis], int)]
    if frozen:
        raise RuntimeError(f"the exported graph's input sizes are fixed ({', '.join(frozen)}), not dynamic: the "
                           "model code turns the image size into a constant somewhere (run with DDETR_VERBOSE=1 "
                           "for torch.export's reason); this file would run at one image size only")


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter's progress lines, its optimizer's notes and its warnings about operators
    of libraries we do not use (torchvision) are not for the user; errors still pass
    (DDETR_VERBOSE=1 keeps everything)."""
    if verbose():
        yield
        return
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), without_library_prints():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
