"""What ranks must share and what they must not: run-level decisions that precede a
collective are rank 0's (ranks reading files on NFS can disagree), random draws after the
weights are built are each rank's own (seed + rank)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .engine_helpers import run_on_ranks, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _evaluated_already(rank: int, base_dir: str, cfg) -> bool:
    from ddetr_dist.engine.eval_hook import EvalHook
    from ddetr_dist.engine.metrics import MetricsLog
    from ddetr_dist.engine.run_dir import RunDir

    # each rank sees its own folder, as nodes whose NFS caches disagree would: only rank
    # 1's holds the evaluation of step 4
    run_dir = RunDir(Path(base_dir) / f"rank{rank}")
    hook = EvalHook(cfg, run_dir, module=None, criterion=None, postprocess=None, device=torch.device("cpu"),
                    metrics=MetricsLog(run_dir.metrics, enabled=False))
    return hook.done_at(4)


def test_whether_the_final_evaluation_is_done_is_decided_by_rank_0(tmp_path, tiny_data):
    seen_by_rank_1 = tmp_path / "rank1" / "eval" / "00000004"
    seen_by_rank_1.mkdir(parents=True)
    (seen_by_rank_1 / "metrics.json").write_text("{}")
    cfg = tiny_config(tiny_data, tmp_path, "data.val_shards=")
    answers = run_on_ranks(_evaluated_already, 2, str(tmp_path), cfg, tmp=tmp_path / "out")
    assert answers == [False, False]  # rank 0 has not: nobody skips the (collective) evaluation


def _after_building(rank: int, cfg, run_dir: str) -> dict:
    from ddetr_dist.engine.checkpointers import FolderCheckpointer
    from ddetr_dist.engine.loop import Trainer
    from ddetr_dist.engine.run_dir import RunDir

    trainer = Trainer(cfg, RunDir(run_dir), FolderCheckpointer(RunDir(run_dir)))
    weights = torch.cat([p.detach().flatten() for p in trainer.engine.module.parameters()])
    return {"weights": weights, "dropout_mask": torch.nn.functional.dropout(torch.ones(256), 0.5) > 0}


def test_ranks_share_the_weights_but_draw_their_own_dropout_masks(tmp_path, tiny_data):
    cfg = tiny_config(tiny_data, tmp_path, "name=seeds", "data.val_shards=", "data.num_workers=0")
    rank0, rank1 = run_on_ranks(_after_building, 2, cfg, str(tmp_path / "seeds"), tmp=tmp_path / "out")
    assert torch.equal(rank0["weights"], rank1["weights"])
    assert not torch.equal(rank0["dropout_mask"], rank1["dropout_mask"])
