"""fp16 (ZeRO-0): the dynamic loss scale halves on an overflow and grows back; overflow
steps are skipped and counted as such, not as bad steps; the logged gradient norm is
unscaled; a resume keeps the scale. On CPUs torch autocasts to fp16 as well, and an
overflow is forced by multiplying the loss by 2**100 (DDETR_INJECT_FP16_OVERFLOW)."""
from __future__ import annotations

import json

import pytest

from ddetr_dist.engine.metrics import read_metrics

from .engine_helpers import run_trainer, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# 2**4: small enough that the tiny model's fp16 gradients never overflow by themselves;
# the scale doubles after 2 clean steps
FP16 = ["train.precision=fp16", "train.loss_scale_power=4", "train.loss_scale_window=2", "train.max_bad_steps=1",
        "data.val_shards=", "data.num_workers=0"]
OVERFLOW_AT = {"DDETR_INJECT_FP16_OVERFLOW": "1,2"}  # steps 1 and 2 (0-based)


def records(run_dir, event="train"):
    return [r for r in read_metrics(run_dir) if r.get("event") == event]


def test_loss_scale_halves_on_overflow_grows_back_and_resumes(tiny_data, tmp_path):
    out = run_trainer(tiny_config(tiny_data, tmp_path, "name=whole", "train.max_steps=6", *FP16), 1,
                      tmp_path / "whole", env=OVERFLOW_AT)
    # max_bad_steps=1 did not abort: overflows while the scale searches are not bad steps
    assert out["progress"]["step"] == 6 and out["progress"]["bad_steps_in_a_row"] == 0
    assert out["progress"]["skipped_steps"] == out["progress"]["overflow_steps"] == 2
    train = records(tmp_path / "whole")
    # record of step n: the scale after n steps; 16, two overflows -> 8 -> 4, two clean -> 8
    assert [r["loss_scale"] for r in train] == [16, 8, 4, 4, 8, 8]
    assert [r["step"] for r in records(tmp_path / "whole", "skipped_step")] == [2, 3]
    assert all(r["reason"] == "fp16 overflow" for r in records(tmp_path / "whole", "skipped_step"))
    assert "grad_norm" not in train[1] and "grad_norm" not in train[2]  # no step taken: no norm

    # a resume restores the scale and its growth counter: the same scales as without a stop
    run_trainer(tiny_config(tiny_data, tmp_path, "name=split", "train.max_steps=4", *FP16), 1, tmp_path / "split",
                env=OVERFLOW_AT)
    run_trainer(tiny_config(tiny_data, tmp_path, "name=split", "train.max_steps=6", *FP16), 1, tmp_path / "split",
                env=OVERFLOW_AT)
    assert [r["loss_scale"] for r in records(tmp_path / "split")] == [16, 8, 4, 4, 8, 8]
    meta = json.loads((tmp_path / "split" / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["loss_scaler"]["scale"] == 8 and meta["overflow_steps"] == 2


def test_logged_gradient_norm_is_unscaled(tiny_data, tmp_path):
    fp32 = [o for o in FP16 if not o.startswith("train.precision")]
    run_trainer(tiny_config(tiny_data, tmp_path, "name=fp32", "train.max_steps=1", *fp32), 1, tmp_path / "fp32")
    run_trainer(tiny_config(tiny_data, tmp_path, "name=fp16", "train.max_steps=1", *FP16), 1, tmp_path / "fp16")
    reference = records(tmp_path / "fp32")[0]["grad_norm"]
    half = records(tmp_path / "fp16")[0]
    assert half["loss_scale"] == 16  # the gradients were scaled by 16: the norm must not be
    assert half["grad_norm"] == pytest.approx(reference, rel=0.05)
