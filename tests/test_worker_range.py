"""`ray.num_workers`: one number, or a range (elastic workers, docs/elastic.md) written
'2-4' (the override form too) or [2, 4]."""
from __future__ import annotations

import pytest

from ddetr_dist.config import ConfigError, check_training_config, config_from_dict, load_config, to_dict


@pytest.mark.parametrize("override, workers, elastic", [
    ("ray.num_workers=3", (3, 3), False),
    ("ray.num_workers=1-2", (1, 2), True),
    ("ray.num_workers=[2, 4]", (2, 4), True),
    ("ray.num_workers=2 - 4", (2, 4), True),
    ("ray.num_workers=2-2", (2, 2), False),
])
def test_a_number_or_a_range(override, workers, elastic):
    ray = load_config(None, [override]).ray
    assert ray.worker_range() == workers and ray.is_elastic() == elastic


def test_a_range_round_trips_through_the_run_config(tmp_path):
    for override in ("ray.num_workers=1-2", "ray.num_workers=[2, 4]"):
        cfg = load_config(None, [override])
        assert config_from_dict(to_dict(cfg)).ray.worker_range() == cfg.ray.worker_range()


@pytest.mark.parametrize("override", ["ray.num_workers=two", "ray.num_workers=[1, 2, 3]", "ray.num_workers=2-"])
def test_a_malformed_value_names_the_key_where_it_is_read(override):
    with pytest.raises(ConfigError, match=r"'ray.num_workers': expected a number of workers \(2\) or a range"):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("ray.num_workers=0-2", "'ray.num_workers': must be >= 1"),
    ("ray.num_workers=4-2", "'ray.num_workers': = '4-2': a range goes from the fewest workers to the most, e.g. 2-4"),
    ("ray.resize_check_s=0", "'ray.resize_check_s': must be > 0"),
])
def test_an_impossible_range_names_the_key(tmp_path, override, message):
    cfg = load_config(None, [f"data.train_shards={tmp_path}", override])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_training_config(cfg)
