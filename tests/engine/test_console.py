"""The console a person reads (#14): one human line per record, or none; the ETA; the
threshold the closing `ddetr predict` command gets; library chatter off unless DDETR_VERBOSE."""
from __future__ import annotations

import json
import logging
import warnings

import torch

from ddetr_dist.console import quiet_libraries
from ddetr_dist.engine.metrics import console_line, duration
from ddetr_dist.engine.metrics_window import MetricsWindow
from ddetr_dist.engine.train_state import Progress
from ddetr_dist.train import detection_threshold

TRAIN = {"event": "train", "step": 50, "epoch": 1, "loss": 3.5, "lr": 1e-4, "images_per_s": 8.0, "data_wait": 0.1,
         "eta_epoch_s": 75.0, "eta_s": 7300.0}


def test_a_train_record_is_one_line_with_the_eta():
    line = console_line(TRAIN)
    assert line.startswith("epoch 1 step 50  loss 3.5000") and line.endswith("ETA epoch 1 min 15 s, run 2 h 01 min")
    assert console_line({**TRAIN, "eta_epoch_s": 0.0}).endswith("ETA run 2 h 01 min")


def test_records_never_reach_the_console_as_json():
    workers = {"event": "workers", "step": 0, "epoch": 0,
               "workers": [{"rank": 0, "host": "a", "pid": 1}, {"rank": 1, "host": "b", "pid": 2}]}
    assert console_line(workers) == "2 workers: rank 0 on a (pid 1), rank 1 on b (pid 2)"
    assert console_line({"event": "checkpoint", "step": 10, "epoch": 1}) == "checkpoint saved at step 10"
    for event in ("eval", "final", "skipped_step", "something new"):  # their own lines, or none
        assert console_line({"event": event, "step": 1, "epoch": 0, "AP": 0.1}) is None
    assert duration(59.6) == "1 min 00 s" and duration(3) == "3 s"


def test_the_eta_counts_the_steps_left_in_the_epoch_and_the_run():
    window = MetricsWindow(2, 5, total_steps=100, device=torch.device("cpu"), loss_weights={},
                           steps_per_epoch=30, grad_accum=2)
    progress = Progress(step=40, batches_in_epoch=20)  # 10 of the epoch's 30 steps done
    assert window.eta(progress, step_time=2.0) == {"eta_epoch_s": 40.0, "eta_s": 120.0}
    progress = Progress(step=95, batches_in_epoch=20)  # the run ends before the epoch does
    assert window.eta(progress, step_time=2.0) == {"eta_epoch_s": 10.0, "eta_s": 10.0}


def test_the_predict_threshold_shows_most_val_images_a_detection(tmp_path):
    path = tmp_path / "detections.json"
    scores = [0.32, 0.36, 0.38, 0.41, 0.44]  # an early demo model: nothing at predict's 0.5
    path.write_text(json.dumps([{"image_id": i, "score": s} for i, s in enumerate(scores)]
                               + [{"image_id": 0, "score": 0.1}]))
    assert detection_threshold(path) == 0.35  # 4 of 5 images keep their best
    path.write_text(json.dumps([{"image_id": 0, "score": 0.9}]))
    assert detection_threshold(path) == 0.5  # never above predict's default
    path.write_text("[]")
    assert detection_threshold(path) is None


def test_library_chatter_is_off_unless_verbose(monkeypatch):
    deepspeed_logger = logging.getLogger("DeepSpeed")
    monkeypatch.setattr(deepspeed_logger, "level", logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
    assert deepspeed_logger.level == logging.WARNING
    monkeypatch.setenv("DDETR_VERBOSE", "1")
    deepspeed_logger.setLevel(logging.INFO)
    quiet_libraries()
    assert deepspeed_logger.level == logging.INFO
