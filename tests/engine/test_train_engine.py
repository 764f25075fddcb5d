"""The train loop without Ray: N processes on gloo, each a DeepSpeed engine. ZeRO stages
agree, a resumed run equals an uninterrupted one bitwise, a checkpoint resumes at another
world size, non-finite losses are skipped on every rank together, model_final.pth loads."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

from ddetr_dist.engine.metrics import read_metrics
from ddetr_dist.engine.train_state import IncompleteCheckpointError, Progress, check_complete
from ddetr_dist.models import build_model, load_official_checkpoint

from .engine_helpers import fixed_batch, run_trainer, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r.get("event") == "train"]


def test_zero_stages_give_the_losses_of_stage_0(tiny_data, tmp_path):
    losses = {}
    for stage in (0, 1, 2, 3):
        cfg = tiny_config(tiny_data, tmp_path, f"name=z{stage}", f"train.zero_stage={stage}", "train.max_steps=5")
        run_trainer(cfg, 2, tmp_path / f"z{stage}")
        losses[stage] = train_losses(tmp_path / f"z{stage}")
    assert len(losses[0]) == 5 and all(map(torch.isfinite, torch.tensor(losses[0])))
    for stage in (1, 2, 3):
        # the same math; ZeRO reduces gradients in another order (reduce-scatter, buckets)
        torch.testing.assert_close(torch.tensor(losses[stage]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-4,
                                   msg=f"ZeRO-{stage} vs stage 0")


@pytest.mark.parametrize("stage, world", [(0, 2), (2, 2), (3, 2), (2, 1)],
                         ids=["zero0", "zero2", "zero3", "zero2-1-rank"])
def test_resumed_run_equals_uninterrupted_run_bitwise(tiny_data, tmp_path, stage, world):
    # loader workers on: the fast-forward must replay their interleaving exactly
    common = [f"train.zero_stage={stage}", "data.num_workers=2", "model.dropout=0.1"]
    whole = run_trainer(tiny_config(tiny_data, tmp_path, "name=whole", "train.max_steps=6",
                                    "train.checkpoint_every_steps=3", *common), world, tmp_path / "whole")
    first = run_trainer(tiny_config(tiny_data, tmp_path, "name=split", "train.max_steps=3", *common), world,
                        tmp_path / "split")
    assert first["progress"]["step"] == 3 and first["progress"]["batches_in_epoch"] == 3  # stopped mid-epoch
    resumed = run_trainer(tiny_config(tiny_data, tmp_path, "name=split", "train.max_steps=6", *common), world,
                          tmp_path / "split")
    assert resumed["progress"]["step"] == 6
    # one rank: the engine runs ZeRO-2 as stage 0 (deepspeed_config.engine_stage), resumed all the same
    ran = json.loads((tmp_path / "split" / "deepspeed_config.json").read_text())["zero_optimization"]["stage"]
    assert ran == (0 if world == 1 else stage)
    for name, value in whole["params"].items():
        assert torch.equal(resumed["params"][name], value), name
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "whole")
    events = [r["event"] for r in read_metrics(tmp_path / "split")]
    assert events.count("resume") == 1


# 2 -> 1 is an elastic run losing a node (docs/elastic.md), 1 -> 2 one getting it back; a
# one-rank ZeRO-1/2 engine runs as stage 0 (deepspeed_config.engine_stage), its checkpoints the same
@pytest.mark.parametrize("saved_world, saved_stage, world, stage",
                         [(2, 2, 1, 2), (2, 3, 1, 3), (2, 2, 1, 3), (1, 2, 2, 2), (1, 1, 2, 2)],
                         ids=["zero2-2to1", "zero3-2to1", "zero2to3-2to1", "zero2-1to2", "zero1to2-1to2"])
def test_checkpoint_resumes_at_another_world_size(tiny_data, tmp_path, saved_world, saved_stage, world, stage):
    run_dir = tmp_path / "resize"
    run_trainer(tiny_config(tiny_data, tmp_path, "name=resize", "train.max_steps=4", f"train.zero_stage={saved_stage}"),
                saved_world, run_dir)
    saved_dir = run_dir / "checkpoints" / "step_00000004"
    check_a_missing_rank_part_is_refused(saved_dir, tmp_path / "broken", saved_world - 1)
    saved = torch.load(saved_dir / "portable.pt", weights_only=True)
    shutil.copytree(saved_dir, tmp_path / "saved")
    # same step: nothing to train; the new engine re-saves what it loaded
    run_trainer(tiny_config(tiny_data, tmp_path, "name=resize", "train.max_steps=4", f"train.zero_stage={stage}"),
                world, run_dir)
    reloaded = torch.load(saved_dir / "portable.pt", weights_only=True)
    assert json.loads((saved_dir / "meta.json").read_text())["world_size"] == world
    assert reloaded["adam_step"] == saved["adam_step"] == 4
    for name, value in saved["model"].items():
        assert torch.equal(reloaded["model"][name], value), name
    assert saved["adam"].keys() == reloaded["adam"].keys() and saved["adam"]
    for name, state in saved["adam"].items():
        for key, value in state.items():
            assert torch.equal(reloaded["adam"][name][key], value), (name, key)
    # and it trains on from there
    out = run_trainer(tiny_config(tiny_data, tmp_path, "name=resize", "train.max_steps=6", f"train.zero_stage={stage}"),
                      world, run_dir)
    assert out["progress"]["step"] == 6 and out["progress"]["world_size"] == world
    assert all(torch.isfinite(p).all() for p in out["params"].values())
    resume = [r for r in read_metrics(run_dir) if r.get("event") == "resume"]
    assert [r["exact"] for r in resume] == [False, True] and resume[0]["from_world_size"] == saved_world
    assert f"ray.num_workers (world size) {saved_world} -> {world}" in resume[0]["changed"]


def check_a_missing_rank_part_is_refused(saved_dir, broken, rank):
    """Every rank's files are listed in meta.json: a checkpoint without rank `rank`'s is
    incomplete, by name (its folder alone does not make it complete)."""
    shutil.copytree(saved_dir, broken)
    rank_parts = [p for p in broken.rglob("*") if p.is_file() and f"rank_{rank}" in p.name]
    assert rank_parts
    rank_parts[0].unlink()
    with pytest.raises(IncompleteCheckpointError, match=rank_parts[0].name):
        check_complete(broken, Progress.read(broken))
    shutil.rmtree(broken)


def test_a_changed_batch_size_resumes_from_the_portable_state_and_says_so(tiny_data, tmp_path):
    run_dir = tmp_path / "order"
    common = ["name=order", "data.num_workers=0"]
    run_trainer(tiny_config(tiny_data, tmp_path, *common, "train.max_steps=2"), 1, run_dir)
    out = run_trainer(tiny_config(tiny_data, tmp_path, *common, "train.max_steps=3", "data.batch_size=1"), 1, run_dir)
    assert out["progress"]["step"] == 3
    [resume] = [r for r in read_metrics(run_dir) if r.get("event") == "resume"]
    # the same world size and stage, but another sample order: not exact, and why
    assert resume["exact"] is False and resume["changed"] == ["data.batch_size 2 -> 1"]


def test_nonfinite_loss_on_one_rank_is_skipped_on_all(tiny_data, tmp_path):
    out = run_trainer(tiny_config(tiny_data, tmp_path, "name=nan", "train.max_steps=5"), 2, tmp_path / "nan",
                      env={"DDETR_INJECT_NONFINITE_LOSS": "1,2@1"})  # rank 1 only; rank 0 reports
    assert out["progress"]["step"] == 5 and out["progress"]["skipped_steps"] == 2
    skipped = [r["step"] for r in read_metrics(tmp_path / "nan") if r.get("event") == "skipped_step"]
    assert skipped == [2, 3]
    assert all(torch.isfinite(p).all() for p in out["params"].values())


def test_a_checkpoint_now_file_makes_every_rank_save_at_the_next_step(tiny_data, tmp_path):
    run_dir = tmp_path / "asked"
    run_dir.mkdir()
    (run_dir / "CHECKPOINT_NOW").touch()  # a checkpoint asked for by hand or by a script
    run_trainer(tiny_config(tiny_data, tmp_path, "name=asked", "train.max_steps=3"), 2, run_dir)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if r.get("event") == "checkpoint_requested"] == [1]
    assert [r["step"] for r in records if r.get("event") == "checkpoint"] == [1, 3]  # asked for, and the end
    assert not (run_dir / "CHECKPOINT_NOW").exists()  # consumed: asked once, saved once


def test_max_bad_steps_in_a_row_abort_with_advice(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "name=bad", "train.max_steps=6", "train.max_bad_steps=2")
    with pytest.raises(ProcessRaisedException, match=r"2 steps in a row .*train.max_bad_steps=2.*lower optim.lr"):
        run_trainer(cfg, 2, tmp_path / "bad", env={"DDETR_INJECT_NONFINITE_LOSS": "1,2,3"})


def test_model_final_loads_as_an_official_checkpoint_and_gives_the_engines_outputs(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "name=final", "train.max_steps=2", "train.zero_stage=3")
    out = run_trainer(cfg, 2, tmp_path / "final")
    model = build_model(cfg)[0]
    assert load_official_checkpoint(tmp_path / "final" / "model_final.pth", model) == []
    for name, value in model.named_parameters():
        assert torch.equal(value, out["params"][name]), name  # the weights bitwise
    with torch.no_grad():
        outputs = model.eval()(*fixed_batch())
    # the workers ran 1 torch thread, this process may run more: sums in another order
    torch.testing.assert_close(outputs["pred_logits"], out["pred_logits"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outputs["pred_boxes"], out["pred_boxes"], rtol=1e-6, atol=1e-6)
    assert set(torch.load(tmp_path / "final" / "model_final.pth", weights_only=True)) >= {"model"}


def test_a_portable_resume_into_gradient_accumulation_trains_on(tiny_data, tmp_path):
    # the portable path's warm-up step must be an accumulation boundary, or it creates no
    # optimizer state to load the moments into
    run_dir = tmp_path / "accum"
    common = ["name=accum", "data.num_workers=0"]
    run_trainer(tiny_config(tiny_data, tmp_path, *common, "train.max_steps=2"), 1, run_dir)
    out = run_trainer(tiny_config(tiny_data, tmp_path, *common, "train.max_steps=3", "data.batch_size=1",
                                  "train.grad_accum=2"), 1, run_dir)
    assert out["progress"]["step"] == 3 and out["progress"]["skipped_steps"] == 0
    [resume] = [r for r in read_metrics(run_dir) if r.get("event") == "resume"]
    assert resume["changed"] == ["data.batch_size 2 -> 1", "train.grad_accum 1 -> 2"]
    # AdamW's step count went on from the checkpoint's 2, the warm-up step not counted
    assert torch.load(run_dir / "checkpoints" / "step_00000003" / "portable.pt", weights_only=True)["adam_step"] == 3
