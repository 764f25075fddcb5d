"""A new run's weights from `model.init_checkpoint` (engine/init_weights.py) and its rules
(models/checkpoint.py): the four kinds of path, class heads of another number of classes,
resume, 'auto' classes without the driver; CPU, one process."""
from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from ddetr_dist.config import ConfigError, load_config, with_num_classes
from ddetr_dist.engine.init_weights import load_init_checkpoint, with_classes_of_data
from ddetr_dist.engine.metrics import MetricsLog, console_line, read_metrics
from ddetr_dist.engine.run_dir import RunDir
from ddetr_dist.models import CheckpointMismatchError, build_model
from ddetr_dist.models.checkpoint import CLASS_HEAD_KEY, class_heads_to_reinitialise

from .engine_helpers import FROM_SCRATCH, TINY_OVERRIDES

NOT_A_HEAD = "transformer.level_embed"


def tiny(*overrides: str):
    return load_config(None, TINY_OVERRIDES + list(overrides))


def weights(seed: int, *overrides: str) -> dict:
    torch.manual_seed(seed)
    return build_model(tiny(*overrides))[0].state_dict()


def write_checkpoint(folder, step: int, sd: dict):
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"step": step}))
    torch.save({"model": sd}, folder / "portable.pt")


@pytest.fixture
def kinds(tmp_path):
    """Each kind of init_checkpoint path -> (the path, the state dict it stands for). The run
    directory's newest checkpoint (step 5) is not its oldest nor its model_final.pth."""
    run = RunDir(tmp_path / "run")
    old, newest, final, released = (weights(seed) for seed in range(4))
    write_checkpoint(run.path / RunDir.ray_checkpoint_name(2, "aaaa"), 2, old)
    write_checkpoint(run.path / RunDir.ray_checkpoint_name(5, "bbbb"), 5, newest)
    torch.save({"model": final}, run.final_model)
    torch.save({"model": released, "optimizer": {}, "epoch": 49}, tmp_path / "r50_deformable_detr-checkpoint.pth")
    return {"released": (tmp_path / "r50_deformable_detr-checkpoint.pth", released),
            "model_final": (run.final_model, final),
            "run_dir": (run.path, newest),
            "checkpoint_folder": (run.path / RunDir.ray_checkpoint_name(2, "aaaa"), old)}


@pytest.mark.parametrize("kind", ["released", "model_final", "run_dir", "checkpoint_folder"])
def test_each_kind_of_path_starts_a_new_run_with_fresh_class_heads(kinds, kind, tmp_path):
    path, expected = kinds[kind]
    cfg = tiny(f"model.init_checkpoint={path}", "model.num_classes=4")  # the checkpoints have 7
    model = build_model(cfg)[0]
    metrics = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    load_init_checkpoint(cfg, model, resuming=False, metrics=metrics)
    loaded = model.state_dict()
    assert torch.equal(loaded[NOT_A_HEAD], expected[NOT_A_HEAD])
    assert all(torch.equal(loaded[k], v) for k, v in expected.items() if not CLASS_HEAD_KEY.match(k))
    assert loaded["class_embed.0.weight"].shape[0] == 4
    [event] = read_metrics(tmp_path)
    assert event["event"] == "init_checkpoint" and event["from"].startswith(str(path))
    assert "class_embed.0.weight" in event["reinitialised"] and all(map(CLASS_HEAD_KEY.match, event["reinitialised"]))
    assert console_line(event).startswith(f"weights from {event['from']} (model.init_checkpoint); class heads "
                                          "re-initialised (another number of classes): class_embed.0.weight")


def test_the_same_classes_load_everything(kinds, tmp_path):
    path, expected = kinds["released"]
    cfg = tiny(f"model.init_checkpoint={path}")
    model = build_model(cfg)[0]
    load_init_checkpoint(cfg, model, resuming=False, metrics=MetricsLog(tmp_path / "metrics.jsonl", enabled=True))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    [event] = read_metrics(tmp_path)
    assert event["reinitialised"] == [] and console_line(event) == f"weights from {path} (model.init_checkpoint)"


def test_a_resumed_run_does_not_read_init_checkpoint(tmp_path, caplog):
    cfg = tiny(f"model.init_checkpoint={tmp_path / 'deleted.pth'}")
    model = build_model(cfg)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="ddetr_dist.train"):
        load_init_checkpoint(cfg, model, resuming=True, metrics=MetricsLog(tmp_path / "metrics.jsonl", enabled=True))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not (tmp_path / "metrics.jsonl").exists()
    assert "resuming: the weights come from the run's own checkpoint" in caplog.text and "deleted.pth" in caplog.text


def test_trainable_and_frozen_batchnorm_checkpoints_fit_each_other():
    """num_batches_tracked is a counter, not a weight: a demo model (trainable BatchNorm)
    fine-tunes with frozen BatchNorm, an official one (frozen) with trainable."""
    trainable, frozen = weights(0, *FROM_SCRATCH), weights(0)
    assert any(k.endswith("num_batches_tracked") for k in trainable)
    assert class_heads_to_reinitialise("x", frozen, trainable) == []
    assert class_heads_to_reinitialise("x", trainable, frozen) == []
    with pytest.raises(CheckpointMismatchError) as error:  # anything else still names the tensors
        class_heads_to_reinitialise("checkpoint x", trainable, weights(0, "model.dec_layers=3"))
    assert "unexpected keys" in str(error.value) and "transformer.decoder.layers.2." in str(error.value)


def test_load_official_checkpoint_takes_a_trainable_batchnorm_checkpoint_into_frozen(tmp_path):
    from ddetr_dist.models import load_official_checkpoint

    torch.save({"model": weights(1, *FROM_SCRATCH)}, tmp_path / "bn.pth")
    torch.save({"model": weights(2)}, tmp_path / "frozen.pth")
    assert load_official_checkpoint(tmp_path / "bn.pth", build_model(tiny())[0]) == []
    assert load_official_checkpoint(tmp_path / "frozen.pth", build_model(tiny(*FROM_SCRATCH))[0]) == []


def test_auto_classes_come_from_the_train_manifest_without_the_driver(tiny_data):
    cfg = tiny(f"data.train_shards={tiny_data / 'train' / 'shards'}", "model.num_classes=auto")
    assert with_classes_of_data(cfg).model.num_classes == 7  # the demo's ids go up to 6
    explicit = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=9))
    assert with_classes_of_data(explicit) is explicit


def test_the_number_of_classes_against_the_data(caplog):
    cfg = tiny()
    assert with_num_classes(tiny("model.num_classes=auto"), 18).model.num_classes == 18
    with pytest.raises(ConfigError, match=r"^config key 'model.num_classes' = 7, but the train manifest's category "
                                          r"ids go up to 17: needs at least 18; set model.num_classes=auto$"):
        with_num_classes(cfg, 18)
    with caplog.at_level(logging.WARNING, logger="ddetr_dist.config"):
        with_num_classes(tiny("model.num_classes=12"), 4)  # more than twice, but only 8 more: fine
        assert not caplog.records
        coco_on_three = tiny("model.num_classes=91")  # a COCO config fine-tuned on 3 classes (ids 1..3)
        assert with_num_classes(coco_on_three, 4) is coco_on_three
    assert "config key 'model.num_classes' = 91" in caplog.text and "87 class outputs never see an example" in caplog.text


def test_an_init_checkpoint_replaces_the_backbone_weights(tmp_path):
    """They are not read (they would be overwritten), nor demanded for a frozen backbone."""
    from ddetr_dist.config import check_training_config

    cfg = tiny("model.backbone_weights=/nonexistent/resnet18.pth", "model.init_checkpoint=released.pth")
    build_model(cfg)  # no FileNotFoundError
    check_training_config(tiny("data.train_shards=x", "model.init_checkpoint=released.pth"))  # frozen BN, no weights
    with pytest.raises(ConfigError, match="model.init_checkpoint="):  # the error offers it
        check_training_config(tiny("data.train_shards=x"))
