"""The official parameter groups and the step schedule with warm-up."""
import pytest
import torch

from ddetr_dist.config import load_config
from ddetr_dist.engine.optim import build_optimizer, lr_factor, param_groups, set_learning_rates
from ddetr_dist.models import build_model


@pytest.fixture(scope="module")
def model_and_cfg():
    cfg = load_config(None, ["model.backbone_depth=18", "model.hidden_dim=32", "model.nheads=2", "model.enc_layers=1",
                             "model.dec_layers=1", "model.num_feature_levels=2", "model.num_queries=4",
                             "model.num_classes=91"])
    return build_model(cfg)[0], cfg


def test_groups_follow_the_official_recipe(model_and_cfg):
    model, cfg = model_and_cfg
    groups = {g["name"]: g for g in param_groups(model, cfg.optim, cfg.model)}
    assert groups["rest"]["lr"] == 2e-4 and groups["backbone"]["lr"] == 2e-5
    assert groups["linear_proj"]["lr"] == pytest.approx(2e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("backbone.0") for p in groups["backbone"]["params"])
    assert all(("sampling_offsets" in names[id(p)] or "reference_points" in names[id(p)])
               for p in groups["linear_proj"]["params"])
    grouped = sum(len(g["params"]) for g in groups.values())
    assert grouped == sum(1 for p in model.parameters() if p.requires_grad)  # each trainable one once
    assert all(p.requires_grad for g in groups.values() for p in g["params"])  # frozen stem/layer1 left out


def test_warmup_then_step_drop(model_and_cfg):
    _, cfg = model_and_cfg
    import dataclasses

    optim = dataclasses.replace(cfg.optim, warmup_steps=4, lr_drop=2, lr_drop_factor=0.1)
    assert [lr_factor(optim, s, 0) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(optim, 100, 1) == 1.0 and lr_factor(optim, 100, 2) == pytest.approx(0.1)
    assert lr_factor(optim, 1, 2) == pytest.approx(0.1 * 0.5)  # both: warm-up of a dropped rate


def test_set_learning_rates_scales_every_group(model_and_cfg):
    model, cfg = model_and_cfg
    optimizer = build_optimizer(model, cfg.optim, cfg.model)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 1e-4
    lrs = set_learning_rates(optimizer, cfg.optim, step=0, epoch=cfg.optim.lr_drop)
    assert lrs == pytest.approx({"rest": 2e-5, "backbone": 2e-6, "linear_proj": 2e-6})
