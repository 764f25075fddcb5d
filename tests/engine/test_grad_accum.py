"""`train.grad_accum`: k micro-batches of b images train exactly as one batch of k*b.

DeepSpeed wants backward() and step() for every micro-batch (the last one of the window
updates the weights); the losses are normalised by the window's boxes, not each
micro-batch's own."""
from __future__ import annotations

import pytest
import torch

from .conftest import SQUARE_OVERRIDES
from .engine_helpers import run_trainer, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_two_micro_batches_of_one_equal_one_batch_of_two(square_data, tmp_path):
    # lr 1e-4: AdamW turns the rounding noise of gradients that are zero in exact arithmetic
    # (attention key biases, biases before GroupNorm) into updates of about lr/10; a window
    # whose step is lost, or micro-batches normalised by their own boxes, move every
    # parameter by ~1e-4
    common = [f"data.train_shards={square_data}", "data.val_shards=", "model.dropout=0", "train.max_steps=3",
              "data.num_workers=0", "optim.lr=1e-4", "optim.lr_backbone=1e-5", *SQUARE_OVERRIDES]
    accumulated = run_trainer(tiny_config(square_data, tmp_path, "name=accum", "data.batch_size=1",
                                          "train.grad_accum=2", *common), 2, tmp_path / "accum")
    whole = run_trainer(tiny_config(square_data, tmp_path, "name=whole", "data.batch_size=2", "train.grad_accum=1",
                                    *common), 2, tmp_path / "whole")
    assert accumulated["progress"]["step"] == whole["progress"]["step"] == 3
    assert accumulated["progress"]["samples_seen"] == whole["progress"]["samples_seen"] == 12
    assert accumulated["progress"]["skipped_steps"] == 0
    for name, value in whole["params"].items():
        torch.testing.assert_close(accumulated["params"][name], value, rtol=0, atol=1e-5, msg=name)
