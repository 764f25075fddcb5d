"""`ddetr convert-checkpoint`: official -> ours -> official, through the CLI entry point."""
from __future__ import annotations

import argparse

import torch

from ddetr_dist.cli import main
from ddetr_dist.models import build_model, load_official_checkpoint

from .conftest import small_config


def test_round_trip_official_ours_official(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model(small_config(num_classes=7, num_queries=12), "box_refine")[0]
    official = tmp_path / "official.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=2e-4), "epoch": 3}, official)

    # nheads is not visible in the weights' shapes: given as an override
    assert main(["convert-checkpoint", str(official), str(tmp_path / "ours.pth"), "model.nheads=4"]) == 0
    ours = torch.load(tmp_path / "ours.pth", weights_only=True)
    assert set(ours) == {"model", "ddetr_dist"}
    assert ours["ddetr_dist"]["variant"] == "box_refine"
    config = ours["ddetr_dist"]["config"]
    inferred = tuple(config[k] for k in ("backbone_depth", "hidden_dim", "num_classes", "num_queries"))
    assert inferred == (18, 64, 7, 12)
    rebuilt = build_model(small_config(**{k: config[k] for k in ("num_classes", "num_queries")}), "box_refine")[0]
    assert load_official_checkpoint(tmp_path / "ours.pth", rebuilt) == []

    assert main(["convert-checkpoint", str(tmp_path / "ours.pth"), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(back) == {"model"}
    original = model.state_dict()
    assert back["model"].keys() == original.keys()
    assert all(torch.equal(back["model"][k], original[k]) for k in original)
    assert "wrote official checkpoint" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.pth", "official.pth", "ours.pth"]  # no temp files


def test_inconsistent_checkpoint_is_refused(tmp_path, capsys):
    state = build_model(small_config(), "base")[0].state_dict()
    state["transformer.decoder.layers.1.norm2.weight"] = torch.zeros(7)
    torch.save({"model": state}, tmp_path / "broken.pth")
    assert main(["convert-checkpoint", str(tmp_path / "broken.pth"), str(tmp_path / "out.pth"), "model.nheads=4"]) == 1
    assert "transformer.decoder.layers.1.norm2.weight: (7,) vs (64,)" in capsys.readouterr().err
    assert not (tmp_path / "out.pth").exists()


def test_forced_direction_and_missing_source(tmp_path, capsys):
    state = build_model(small_config(), "single_scale")[0].state_dict()
    torch.save({"model": state}, tmp_path / "official.pth")
    assert main(["convert-checkpoint", "--to", "official", str(tmp_path / "official.pth"), str(tmp_path / "copy.pth"),
                 "model.nheads=4"]) == 0
    assert set(torch.load(tmp_path / "copy.pth", weights_only=True)) == {"model"}
    assert main(["convert-checkpoint", str(tmp_path / "nope.pth"), str(tmp_path / "x.pth")]) == 1
    assert "not found" in capsys.readouterr().err
