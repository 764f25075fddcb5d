"""An exported detector (engine/onnx_export.py) run by onnxruntime, called like the PyTorch
model: `(images, padding_mask) -> {'pred_logits', 'pred_boxes'}`, so that `ddetr predict
--onnx` shares every step before and after the model with the PyTorch path; and the check
that an export computes what the PyTorch model computes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ddetr_dist.config import Config, config_from_dict
from ddetr_dist.engine.onnx_export import CATEGORIES_KEY, CONFIG_KEY, DETECTION_INPUT, INPUTS, MIN_SIDE_KEY, \
    ExportedDetector, example_inputs

INSTALL_HINT = "pip install 'ddetr_dist[export]' (onnx, onnxscript, onnxruntime)"


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"running an exported model needs onnxruntime: {INSTALL_HINT}") from e
    return onnxruntime


class OnnxDetector:
    """`OnnxDetector('model.onnx')(images, padding_mask)` -> the PyTorch model's output dict
    (its last layer: pred_logits, pred_boxes), as CPU tensors."""

    def __init__(self, path: str | Path, threads: int = 0):
        ort = import_onnxruntime()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's choice (all cores)
        options.log_severity_level = 3  # errors only: its graph-optimisation notes are not for the user
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        if self.input_names[:2] != list(INPUTS):
            raise ValueError(f"{path}: not a `ddetr export` model (inputs {self.input_names}, expected "
                             f"{list(INPUTS)} first)")
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.min_side = int(self.metadata.get(MIN_SIDE_KEY, 1))
        self.path = path

    def config(self) -> Config | None:
        """The config the model was exported with (its data section: the val transform)."""
        import yaml

        text = self.metadata.get(CONFIG_KEY)
        return config_from_dict(yaml.safe_load(text)) if text else None

    def category_names(self) -> dict[int, str]:
        return {int(k): v for k, v in json.loads(self.metadata.get(CATEGORIES_KEY, "{}")).items()}

    def __call__(self, images: torch.Tensor, padding_mask: torch.Tensor) -> dict:
        if min(images.shape[-2:]) < self.min_side:
            raise ValueError(f"an image of {images.shape[-2]}x{images.shape[-1]} pixels after the val transform is "
                             f"smaller than {self.path} takes (height and width >= {self.min_side}); raise "
                             "data.val_scale")
        feed = {"images": images.float().numpy(), "padding_mask": padding_mask.numpy()}
        if DETECTION_INPUT in self.input_names:  # the detections are not used here: any sizes do
            feed[DETECTION_INPUT] = np.tile(np.array(images.shape[-2:], dtype=np.int64), (images.shape[0], 1))
        logits, boxes = self.session.run(["logits", "boxes"], feed)
        return {"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes)}


def largest_difference(path: str | Path, model, sizes: list[tuple[int, int]], detections: bool = False) -> dict:
    """Max |onnxruntime - PyTorch| of the logits, the boxes and (with detections) the scores,
    per case: each (height, width) of `sizes` as a batch of two images (the second padded
    on the right half). -> {'HxW': difference}. The detections' labels and pixel boxes are
    not compared element by element: two scores 1e-7 apart may come out in either order."""
    ort = import_onnxruntime()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = ExportedDetector(model.eval(), detections).eval()
    found = {}
    for height, width in sizes:
        inputs = example_inputs(model, detections, (height, width))
        with torch.no_grad():
            expected = wrapper(*inputs)
        got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})
        compared = zip(got[:3], expected[:3])  # logits, boxes, (sorted) scores
        found[f"{height}x{width}"] = max(float(np.abs(g.astype(np.float64) - e.numpy().astype(np.float64)).max())
                                         for g, e in compared)
    return found
