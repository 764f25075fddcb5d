"""ZeRO-0 on a CPU (engine/stale_gradients.py): a step's gradients live until the next step's
first backward, which frees them before it computes (DeepSpeed would free them right after
the update: the next backward's fresh pages cost 5% of a CPU step); nothing is accumulated
onto them."""
from __future__ import annotations

import pytest
import torch

from ddetr_dist.config import load_config
from ddetr_dist.engine.deepspeed_config import deepspeed_config, import_deepspeed
from ddetr_dist.engine.metrics_window import StepTimes
from ddetr_dist.engine.stale_gradients import frees_late
from ddetr_dist.engine.step import WindowStep


class Scale(torch.nn.Module):
    """pred = w * images: the gradient of sum(pred) is the images, whatever w is."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, images, padding_mask):
        return {"pred": self.w * images}


class SumLoss:
    weight_dict = {"loss_sum": 1.0}

    def __call__(self, outputs, targets, num_boxes):
        return {"loss_sum": outputs["pred"].sum()}


def window(images: torch.Tensor) -> list:
    return [(images, torch.zeros(1, dtype=torch.bool), [{"labels": torch.zeros(1, dtype=torch.int64)}])]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_zero0_frees_a_steps_gradients_before_the_next_backward(grad_accum, one_process):
    deepspeed = import_deepspeed()
    cfg = load_config(None, ["data.batch_size=1", f"train.grad_accum={grad_accum}", "optim.clip_max_norm=0"])
    model = Scale()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                      config=deepspeed_config(cfg, world_size=1), dist_init_required=False)
    step = WindowStep(engine, SumLoss(), torch.device("cpu"))
    first, second = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[10.0, 20.0, 30.0]])
    assert step.run(window(first) * grad_accum, StepTimes()).applied
    # kept through the update (DeepSpeed's step would have set it to None)
    torch.testing.assert_close(model.w.grad, first[0])
    before = model.w.detach().clone()
    assert step.run(window(second) * grad_accum, StepTimes()).applied
    # the second step's gradient alone (the mean over its micro-batches), not added to the first's
    torch.testing.assert_close(model.w.grad, second[0])
    torch.testing.assert_close(model.w.detach(), before - second[0])


def test_only_zero0_on_a_cpu_frees_late():
    # a GPU's caching allocator reuses freed blocks; ZeRO-1/2/3 keep gradients in their own buffers
    assert frees_late(0, torch.device("cpu"))
    assert not frees_late(0, torch.device("cuda"))
    assert not any(frees_late(stage, torch.device("cpu")) for stage in (1, 2, 3))
