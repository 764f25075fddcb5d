"""The driver's side of a range of workers (`ray.num_workers=2-4`, docs/elastic.md), without
starting Ray: the resource check asks room for the fewest, Ray Train gets an elastic
ScalingConfig, and `ddetr tune` refuses a range before Ray starts."""
from __future__ import annotations

import pytest

from ddetr_dist.config import ConfigError, load_config
from ddetr_dist.tune import main as tune_main

from engine.engine_helpers import FROM_SCRATCH

from .ray_helpers import write_tiny_config

TWO_NODES = [{"CPU": 0}, {"CPU": 1}, {"CPU": 1}]  # a CPU head and 2 one-CPU workers (tests/cluster)


def config(*overrides: str):
    return load_config(None, ["data.train_shards=x", *FROM_SCRATCH, *overrides])


def test_a_range_starts_when_its_fewest_fit():
    from ddetr_dist.on_ray.placement import check_resources

    assert check_resources(config("ray.num_workers=1-4"), TWO_NODES) is False  # 2 fit: Ray starts 2
    assert check_resources(config("ray.num_workers=2-4"), TWO_NODES) is False
    with pytest.raises(ConfigError, match=r"'ray.num_workers' \(3-4\).*hold 2 such worker\(s\) \(a range: at least 3\)"):
        check_resources(config("ray.num_workers=3-4"), TWO_NODES)
    with pytest.raises(ConfigError, match=r"'ray.num_workers' \(4\).*hold 2 such worker\(s\) \(the largest"):
        check_resources(config("ray.num_workers=4"), TWO_NODES)  # one number: all of it, as before


def test_ray_train_gets_an_elastic_scaling_config_for_a_range():
    from ddetr_dist.on_ray.driver import scaling_config

    elastic = scaling_config(config("ray.num_workers=[1, 2]", "ray.resize_check_s=5"), use_gpu=False)
    assert elastic.num_workers == (1, 2) and elastic.elasticity_enabled
    assert elastic.elastic_resize_monitor_interval_s == 5
    fixed = scaling_config(config("ray.num_workers=2-2"), use_gpu=False)
    assert fixed.num_workers == 2 and not fixed.elasticity_enabled


def test_tune_refuses_a_range_before_ray_starts(tiny_data, tmp_path, capsys):
    tiny = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "tiny")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: s\nmetric: val_loss\nspace: {optim.lr: {choice: [1.0e-3]}}\n")
    assert tune_main(["--config", str(tiny), "--sweep", str(sweep), "ray.num_workers=1-2"]) == 2
    err = capsys.readouterr().err
    assert "config key 'ray.num_workers' = '1-2' is a range (elastic workers), which `ddetr tune` does not take" in err
    assert not (tmp_path / "runs").exists()
