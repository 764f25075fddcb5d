"""`ddetr bench train` takes (a)'s plain steps and (b)'s engine steps in turn
(on_ray/bench_paired.py): beside each engine step one plain step on its batch, before and
after it in turn, timed apart, so that (b)'s time can be its window's less (a)'s."""
import time

import pytest

from ddetr_dist.on_ray.bench_paired import take_plain_steps_beside


class FakeTrainer:
    def __init__(self, calls):
        self.calls = calls

    def _optimizer_step(self, window):
        time.sleep(0.2)
        self.calls.append(("engine", window[0][0]))


def test_each_engine_step_has_one_plain_step_on_its_batch_before_or_after_it_in_turn_timed_apart():
    calls, timed = [], []

    def plain_step(images, mask, targets, times, tick):
        time.sleep(0.02)
        times["forward"] += 0.5
        calls.append(("plain", images))

    trainer = FakeTrainer(calls)
    take_plain_steps_beside(trainer, plain_step, timed)
    for batch in ("b1", "b2"):
        trainer._optimizer_step([(batch, None, [])])
    assert calls == [("plain", "b1"), ("engine", "b1"), ("engine", "b2"), ("plain", "b2")]
    assert len(timed) == 2 and all(0.02 <= t["total"] < 0.2 for t in timed)  # the plain step's time alone
    assert [t["forward"] for t in timed] == [0.5, 0.5]
    with pytest.raises(ValueError, match="train.grad_accum=1"):
        trainer._optimizer_step([("b3", None, []), ("b4", None, [])])
