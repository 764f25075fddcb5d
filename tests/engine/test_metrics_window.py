"""The loop's data time is what a plain `for batch in loader` loop pays between steps: the
wait for the next batch and the release of the last one."""
from __future__ import annotations

import time

import torch

from ddetr_dist.engine.metrics_window import MetricsWindow

RELEASE_S = 0.05


class SlowToRelease:
    """A batch whose memory takes RELEASE_S to go back."""

    def __del__(self):
        time.sleep(RELEASE_S)


def test_the_used_batches_are_released_within_the_data_time():
    window = MetricsWindow(world_size=1, log_every_steps=10, total_steps=10, device=torch.device("cpu"),
                           loss_weights={})
    used = [(SlowToRelease(), None, [])]
    assert window.next_batches(iter([("next", None, [])]), 1, used=used) == [("next", None, [])]
    assert used == []
    assert window.times.data >= RELEASE_S
