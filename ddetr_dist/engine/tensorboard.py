"""TensorBoard on rank 0 (the run directory's `tensorboard/`): a sink of `MetricsLog`, so every
number that goes to metrics.jsonl also becomes a scalar, plus pictures and hparams."""
from __future__ import annotations

import numbers
from pathlib import Path

import numpy as np

from ddetr_dist.config import Config, to_dict

NOT_SCALARS = {"step", "epoch", "time", "event", "eta_s", "eta_epoch_s"}


def scalar_tag(event: str, key: str) -> str:
    if key.startswith("lr_"):
        return f"lr/{key[3:]}"
    if key.startswith("loss") or key in ("class_error", "cardinality_error"):
        return f"loss/{key}"
    if key.startswith("time_") or key in ("step_time", "data_wait"):
        return f"time/{key.removeprefix('time_')}"
    return f"{event}/{key}"


class TensorBoardSink:
    def __init__(self, log_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)

    def __call__(self, record: dict) -> None:
        event, step = record.get("event"), record.get("step", 0)
        if event not in ("train", "eval", "skipped_step"):
            return
        for key, value in record.items():
            if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, numbers.Number):
                continue
            self.writer.add_scalar(scalar_tag(event, key), value, step)
        self.writer.flush()

    def add_image(self, tag: str, image, step: int) -> None:
        self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def add_hparams(self, hparams: dict, metrics: dict) -> None:
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        self.writer.add_hparams(flat, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def flat_hparams(cfg: Config) -> dict:
    """The config, flattened (`section.key`), as TensorBoard hparams."""
    flat = {}
    for section, values in to_dict(cfg).items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            flat[section] = values
    return flat
