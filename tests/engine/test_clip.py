"""The gradient norm and clip: ZeRO-0 clips the gradients itself (DeepSpeed gets
gradient_clipping 0 there), so the step that is applied moves the weights by the clipped
gradient and logs the norm before the clip; ZeRO-1/2's fused norm is DeepSpeed's own number."""
from __future__ import annotations

import pytest
import torch

from ddetr_dist.config import load_config
from ddetr_dist.engine.deepspeed_config import deepspeed_config, import_deepspeed
from ddetr_dist.engine.step import WindowStep
from ddetr_dist.engine.zero_grad_norm import use_fused_grad_norm


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_zero0_step_applies_the_clipped_gradient_and_logs_the_norm_before_the_clip(precision, one_process):
    deepspeed = import_deepspeed()
    cfg = load_config(None, ["optim.clip_max_norm=0.1", "data.batch_size=1", f"train.precision={precision}"])
    ds_config = deepspeed_config(cfg, world_size=1)
    assert ds_config["gradient_clipping"] == 0.0  # the loop's clip, not DeepSpeed's as well
    model = torch.nn.Linear(3, 4)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is the gradient itself
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    scaler = None
    if precision == "fp16":
        scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
        engine.torch_autocast_z0_gradscaler = scaler
        scaler.scale(torch.ones(()))  # what DeepSpeed's backward does first: the scale exists
    scale = scaler.get_scale() if scaler is not None else 1.0
    for p in model.parameters():
        p.grad = torch.full_like(p, 2.0 * scale)  # scaled under fp16, as backward leaves them
    expected_norm = 2.0 * sum(p.numel() for p in model.parameters()) ** 0.5
    result = WindowStep(engine, None, torch.device("cpu"), scaler, clip_max_norm=0.1)._step_zero0(bad=False)
    assert result.applied
    assert result.grad_norm == pytest.approx(expected_norm, rel=1e-5)
    moved = torch.linalg.vector_norm(torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())]))
    assert float(moved) == pytest.approx(0.1, rel=1e-4)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_fused_gradient_norm_equals_deepspeeds_own(stage, one_process):
    deepspeed = import_deepspeed()
    cfg = load_config(None, ["data.batch_size=1", f"train.zero_stage={stage}"])
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    ds_config = deepspeed_config(cfg, world_size=1)
    # DeepSpeed's ZeRO optimizer itself, in this one-rank process (our config builds one rank as ZeRO-0)
    ds_config["zero_optimization"]["stage"] = stage
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                      config=ds_config, dist_init_required=False)
    zero = engine.optimizer
    per_gradient = zero.get_grad_norm_direct
    assert use_fused_grad_norm(zero)
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    torch.testing.assert_close(zero.get_grad_norm_direct(grads, params), per_gradient(grads, params))
    grads[1][0] = float("inf")  # DeepSpeed's overflow check reads -1
    assert float(zero.get_grad_norm_direct(grads, params)) == float(per_gradient(grads, params)) == -1.0
