"""A checkpoint directory missing a part is refused by name, never half-loaded."""
import json
from dataclasses import asdict

import pytest

from ddetr_dist.engine.train_state import IncompleteCheckpointError, Progress, check_complete


def write_checkpoint(folder, files):
    progress = Progress(step=7, world_size=2, files=files)
    folder.mkdir()
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    (folder / "meta.json").write_text(json.dumps(asdict(progress)))
    return progress


def test_complete_checkpoint_passes(tmp_path):
    files = ["portable.pt", "deepspeed/step_7", "rank_state/rank_0.pt", "rank_state/rank_1.pt"]
    write_checkpoint(tmp_path / "ckpt", files)
    progress = Progress.read(tmp_path / "ckpt")
    assert progress.step == 7 and progress.world_size == 2
    check_complete(tmp_path / "ckpt", progress)


def test_missing_rank_file_is_named(tmp_path):
    files = ["portable.pt", "rank_state/rank_0.pt", "rank_state/rank_1.pt"]
    progress = write_checkpoint(tmp_path / "ckpt", files)
    (tmp_path / "ckpt" / "rank_state" / "rank_1.pt").unlink()
    with pytest.raises(IncompleteCheckpointError, match=r"incomplete: missing rank_state/rank_1.pt.*delete this"):
        check_complete(tmp_path / "ckpt", progress)


def test_checkpoint_without_meta_was_not_finished(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(IncompleteCheckpointError, match="no meta.json: it was not written to the end"):
        Progress.read(tmp_path / "ckpt")
