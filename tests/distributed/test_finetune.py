"""Fine-tuning (issue #15, docs/finetuning.md): a COCO dataset with its own sparse category
ids, sharded by `ddetr shard`, fine-tuned from a checkpoint trained on the demo classes with
`ddetr train --config configs/finetune.yaml model.init_checkpoint=...`, then `ddetr eval`
and `ddetr predict`; and the checks that stop a fine-tuning run before any worker starts."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch

from ddetr_dist import cli
from ddetr_dist.config import ConfigError, REPO, load_config
from ddetr_dist.models import build_model
from ddetr_dist.models.checkpoint import CLASS_HEAD_KEY
from ddetr_dist.on_ray.driver import check_before_start
from engine.engine_helpers import FROM_SCRATCH, TINY_OVERRIDES

from .ray_helpers import records, run_train

# the walk-through's dataset is the one tools/finetune_ap.py measures with
_spec = importlib.util.spec_from_file_location("finetune_ap", REPO / "tools" / "finetune_ap.py")
finetune_ap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(finetune_ap)

# the tiny model, its number of classes left to the data (model.num_classes=auto)
TINY_AUTO = [o for o in TINY_OVERRIDES if not o.startswith(("model.num_classes=", "optim."))]


@pytest.fixture(scope="module")
def sparse_data(tiny_data, tmp_path_factory):
    return finetune_ap.sparse_dataset(tiny_data, tmp_path_factory.mktemp("sparse"))


@pytest.fixture(scope="module")
def pretrained(tiny_data, tmp_path_factory) -> Path:
    """A checkpoint as a release is saved ({'model': state_dict}), trained (3 plain steps) on
    the demo's 7 classes with trainable BatchNorm: fine-tuning freezes it (its BatchNorm
    counters are then not the model's)."""
    from ddetr_dist.data import build_train_loader

    cfg = load_config(None, TINY_OVERRIDES + FROM_SCRATCH + [f"data.train_shards={tiny_data / 'train' / 'shards'}"])
    torch.manual_seed(0)
    model, criterion, _ = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _, (images, padding_mask, targets) in zip(range(3), build_train_loader(cfg.data, seed=0, rank=0,
                                                                                world_size=1)):
        losses = criterion(model(images, padding_mask), targets)
        optimizer.zero_grad()
        sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("released") / "demo_classes.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def finetune_overrides(data: Path, out: Path, name: str, init: Path | str) -> list[str]:
    return TINY_AUTO + [f"name={name}", f"output_dir={out}", f"model.init_checkpoint={init}",
                        f"data.train_shards={data / 'train' / 'shards'}", f"data.val_shards={data / 'val' / 'shards'}"]


def state_dict(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_finetuning_walkthrough(tiny_data, sparse_data, pretrained, tmp_path, capsys):
    config = REPO / "configs" / "finetune.yaml"
    done = run_train(config, *finetune_overrides(sparse_data, tmp_path / "runs", "ft", pretrained),
                     "ray.num_workers=1", "train.max_steps=3", "train.pictures=0", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ft"
    assert load_config(run_dir / "config.yaml").model.num_classes == 43  # auto: max id 42 + 1
    # the class heads re-initialised (7 -> 43 classes) and named; everything else loaded
    init = records(run_dir, "init_checkpoint")
    assert len(init) == 1 and init[0]["from"] == str(pretrained)
    heads = init[0]["reinitialised"]
    assert "class_embed.0.weight" in heads and all(CLASS_HEAD_KEY.match(k) for k in heads)
    console = done.stdout + done.stderr
    assert "weights from " in console and "class heads re-initialised" in console
    before, after = state_dict(pretrained), state_dict(run_dir / "model_final.pth")
    for frozen in ("backbone.0.body.conv1.weight", "backbone.0.body.bn1.running_var"):  # stem: frozen, as loaded
        assert torch.equal(before[frozen], after[frozen]), frozen
    assert after["class_embed.0.weight"].shape[0] == 43 and before["class_embed.0.weight"].shape[0] == 7
    # `ddetr eval` and `ddetr predict` on it: the number of classes from the checkpoint
    assert cli.main(["eval", "--checkpoint", str(run_dir)]) == 0
    assert "AP50" in capsys.readouterr().out
    assert cli.main(["predict", str(tiny_data / "val" / "images"), "--checkpoint", str(run_dir / "model_final.pth"),
                     "--threshold", "0", "--out", str(tmp_path / "preds")]) == 0
    detections = [d for f in (tmp_path / "preds").glob("*.json") for d in json.loads(f.read_text())["detections"]]
    named = {d["category"] for d in detections if d["label"] in {i for i, _ in finetune_ap.SPARSE.values()}}
    assert named and named <= {name for _, name in finetune_ap.SPARSE.values()}, named  # the new dataset's names
    assert not {"circle", "square", "triangle"} & {d["category"] for d in detections}


# ------------------------------------------------------------------ before any worker starts


def test_too_few_classes_fail_before_the_workers_naming_both_numbers(sparse_data, tmp_path):
    cfg = load_config(None, finetune_overrides(sparse_data, tmp_path, "x", "") + FROM_SCRATCH
                      + ["model.num_classes=5"])
    with pytest.raises(ConfigError, match=r"config key 'model.num_classes' = 5, but the train manifest's category "
                                          r"ids go up to 42: needs at least 43; set model.num_classes=auto"):
        check_before_start(cfg)


def test_auto_is_resolved_before_the_workers_and_far_too_many_classes_warn(sparse_data, tmp_path, caplog):
    base = finetune_overrides(sparse_data, tmp_path, "x", "") + FROM_SCRATCH
    assert check_before_start(load_config(None, base)).model.num_classes == 43
    with caplog.at_level(logging.WARNING, logger="ddetr_dist.config"):
        assert check_before_start(load_config(None, base + ["model.num_classes=43"])).model.num_classes == 43
        assert not caplog.records
        check_before_start(load_config(None, base + ["model.num_classes=120"]))
    assert "'model.num_classes' = 120" in caplog.text and "77 class outputs never see an example" in caplog.text


def test_an_init_checkpoint_of_another_model_fails_before_the_workers_naming_tensors(sparse_data, tmp_path):
    released = tmp_path / "released.pth"  # the tiny model on the demo's 7 classes, as a release is saved
    torch.save({"model": build_model(load_config(None, TINY_OVERRIDES))[0].state_dict()}, released)
    base = finetune_overrides(sparse_data, tmp_path, "x", released)
    assert check_before_start(load_config(None, base)).model.num_classes == 43  # fits, but for its class heads
    with pytest.raises(ConfigError) as error:
        check_before_start(load_config(None, base + ["model.dec_layers=3"]))
    message = str(error.value)
    assert f"config key 'model.init_checkpoint' = '{released}'" in message and "does not fit the model" in message
    assert "transformer.decoder.layers.2." in message  # the tensors the checkpoint lacks


def test_an_init_checkpoint_that_is_no_checkpoint_fails_before_the_workers(sparse_data, tmp_path):
    (tmp_path / "notes.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"config key 'model.init_checkpoint' = .*notes.pth.*cannot read"):
        check_before_start(load_config(None, finetune_overrides(sparse_data, tmp_path, "x", tmp_path / "notes.pth")))


def test_a_missing_init_checkpoint_fails_before_the_workers_or_warns_on_a_cluster(sparse_data, tmp_path, monkeypatch,
                                                                                 caplog):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(None, finetune_overrides(sparse_data, tmp_path, "x", tmp_path / "nope.pth"))
    with pytest.raises(ConfigError, match=r"config key 'model.init_checkpoint' = .*nope.pth.*not found"):
        check_before_start(cfg)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a cluster's nodes may have the file this one lacks
    with caplog.at_level(logging.WARNING, logger="ddetr_dist.train"):
        check_before_start(cfg)
    assert "nope.pth" in caplog.text and "the workers' nodes may have it" in caplog.text


def test_a_new_run_on_a_node_without_the_init_checkpoint_fails_without_retries(tmp_path, monkeypatch):
    from ddetr_dist.engine.init_weights import load_init_checkpoint
    from ddetr_dist.engine.metrics import MetricsLog
    from ddetr_dist.on_ray.failures import is_deterministic
    from ddetr_dist.on_ray.worker import check_inputs

    monkeypatch.chdir(tmp_path)
    # backbone_weights missing too, but not read: the init checkpoint replaces them
    cfg = load_config(None, ["model.init_checkpoint=runs/r50", "model.backbone_weights=weights/missing.pth",
                             "model.num_classes=7"])
    check_inputs(cfg)
    model, metrics = build_model(cfg)[0], MetricsLog(tmp_path / "metrics.jsonl", enabled=False)
    with pytest.raises(FileNotFoundError) as error:
        load_init_checkpoint(cfg, model, resuming=False, metrics=metrics)
    assert is_deterministic(error.value) and "'model.init_checkpoint' = 'runs/r50'" in str(error.value)
    load_init_checkpoint(cfg, model, resuming=True, metrics=metrics)  # a resume does not read it


def test_a_resume_does_not_need_the_init_checkpoint_any_more(sparse_data, tmp_path, caplog):
    """Fine-tuned runs resume from their own checkpoints: the file they started from may be gone."""
    cfg = load_config(None, finetune_overrides(sparse_data, tmp_path, "resumed", tmp_path / "deleted.pth"))
    checkpoint = tmp_path / "resumed" / "checkpoint_000000010_abc"
    checkpoint.mkdir(parents=True)
    (checkpoint / "meta.json").write_text(json.dumps({"step": 10}))
    (checkpoint / "portable.pt").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="ddetr_dist.train"):
        check_before_start(cfg)
    assert "model.init_checkpoint" in caplog.text and "is not read" in caplog.text
