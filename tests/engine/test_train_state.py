"""A checkpoint directory missing a part is refused by name, never half-loaded."""
import json
from dataclasses import asdict

import pytest

from ddetr_dist.engine.train_state import IncompleteCheckpointError, Progress, check_complete

FILES = ["portable.pt", "rank_state/rank_0.pt", "rank_state/rank_1.pt"]


def write_checkpoint(folder, files=FILES, listed=None):
    """Files of 3 bytes each; meta.json lists `listed` (default: every file with its size)."""
    progress = Progress(step=7, world_size=2, files=listed if listed is not None else {f: 3 for f in files})
    folder.mkdir()
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"xyz")
    (folder / "meta.json").write_text(json.dumps(asdict(progress)))
    return Progress.read(folder)


def test_complete_checkpoint_passes(tmp_path):
    progress = write_checkpoint(tmp_path / "ckpt")
    assert progress.step == 7 and progress.world_size == 2
    check_complete(tmp_path / "ckpt", progress)


def test_a_missing_rank_file_is_named(tmp_path):
    progress = write_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / FILES[2]).unlink()  # rank 1's part: its folder is still there
    with pytest.raises(IncompleteCheckpointError, match=r"incomplete: rank_state/rank_1.pt \(missing\).*delete this"):
        check_complete(tmp_path / "ckpt", progress)


def test_a_truncated_file_is_named(tmp_path):
    progress = write_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "rank_state" / "rank_1.pt").write_bytes(b"x")
    with pytest.raises(IncompleteCheckpointError, match=r"rank_state/rank_1.pt \(1 bytes, 3 written\)"):
        check_complete(tmp_path / "ckpt", progress)


def test_a_checkpoint_listing_names_only_is_checked_for_their_presence(tmp_path):
    progress = write_checkpoint(tmp_path / "ckpt", listed=FILES)  # meta.json of an earlier version
    assert progress.files == {f: None for f in FILES}
    check_complete(tmp_path / "ckpt", progress)
    (tmp_path / "ckpt" / "portable.pt").unlink()
    with pytest.raises(IncompleteCheckpointError, match="portable.pt"):
        check_complete(tmp_path / "ckpt", progress)


def test_checkpoint_without_meta_was_not_finished(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(IncompleteCheckpointError, match="no meta.json: it was not written to the end"):
        Progress.read(tmp_path / "ckpt")
