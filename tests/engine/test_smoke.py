"""The end-to-end pipeline that `make demo` runs: shards -> loader -> model -> losses -> steps."""
import re

from ddetr_dist.data import demo
from ddetr_dist.engine import smoke


def test_pipeline_runs_end_to_end_on_demo_shards(tmp_path, capsys):
    demo.generate(tmp_path, train=8, val=2, seed=1, images_per_shard=4, workers=1, progress=False)
    code = smoke.main(["--config", "configs/demo.yaml", "--steps", "3",
                       f"data.train_shards={tmp_path / 'train' / 'shards'}",
                       f"data.val_shards={tmp_path / 'val' / 'shards'}",
                       "data.num_workers=0", "data.batch_size=2", "model.num_queries=10",
                       "data.train_scales=[128]", "data.crop_scales=[96]", "data.crop_min_size=64",
                       "data.crop_max_size=96", "data.val_scale=128", "data.max_size=200"])
    out = capsys.readouterr().out
    assert code == 0
    losses = [float(x) for x in re.findall(r"step +\d+ +loss +([0-9.]+)", out)]
    assert len(losses) == 2  # printed at the first and the last step
    assert "over 3 steps; skipped samples: nothing skipped" in out
    assert len(re.findall(r"val image \d+: \d+ objects", out)) == 2
