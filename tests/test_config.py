from pathlib import Path

import pytest
import yaml

from ddetr_dist.config import Config, ConfigError, load_config, parse_override, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_base_chain_and_overrides_apply_in_order():
    cfg = load_config(CONFIGS / "two_stage.yaml", ["model.hidden_dim=128", "data.train_scales=[320, 352]"])
    assert cfg.model.two_stage and cfg.model.with_box_refine  # from two_stage.yaml
    assert cfg.model.backbone_depth == 50  # from base.yaml
    assert cfg.model.hidden_dim == 128
    assert cfg.data.train_scales == (320, 352)


def test_override_parses_yaml_values():
    assert parse_override("model.dropout=0") == {"model": {"dropout": 0}}
    assert load_config(None, ["model.dropout=0"]).model.dropout == 0.0  # int accepted for float
    assert load_config(None, ["model.msda_backend=null"]).model.msda_backend is None
    assert load_config(None, ["model.msda_backend=cpu"]).model.msda_backend == "cpu"


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.hiden_dim=3"])
    msg = str(err.value)
    assert "model.hiden_dim" in msg and "hidden_dim" in msg and "Did you mean 'hidden_dim'" in msg
    assert "num_queries" in msg  # lists the valid keys


def test_unknown_section_and_bad_types():
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(None, ["modle.hidden_dim=3"])
    with pytest.raises(ConfigError, match="model.hidden_dim.*integer"):
        load_config(None, ["model.hidden_dim=wide"])
    with pytest.raises(ConfigError, match="model.two_stage.*true or false"):
        load_config(None, ["model.two_stage=1"])
    with pytest.raises(ConfigError, match="data.train_scales"):
        load_config(None, ["data.train_scales=800"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["model.hidden_dim"])
    with pytest.raises(ConfigError, match="'model' must be a mapping"):
        load_config(None, ["model=3"])


def test_missing_file_and_base_cycle(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "demo.yaml", ["seed=7"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["seed"] == 7
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_training_sections_default_to_the_official_recipe():
    cfg = Config()
    assert (cfg.optim.lr, cfg.optim.lr_backbone, cfg.optim.lr_linear_proj_mult) == (2e-4, 2e-5, 0.1)
    assert (cfg.optim.weight_decay, cfg.optim.epochs, cfg.optim.lr_drop, cfg.optim.clip_max_norm) == (1e-4, 50, 40, 0.1)
    assert (cfg.train.precision, cfg.train.zero_stage, cfg.train.max_steps) == ("fp32", 0, 0)


def test_exponent_floats_without_a_dot_are_floats():
    # YAML 1.1 reads 1e-3 as a string; a learning rate written so must still work
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3
    with pytest.raises(ConfigError, match="'optim.lr': expected float"):
        load_config(None, ["optim.lr=fast"])


@pytest.mark.parametrize("override, message", [
    ("train.zero_stage=4", "'train.zero_stage': must be 0, 1, 2 or 3"),
    ("train.precision=fp8", "'train.precision': must be one of fp32, bf16, fp16"),
    ("train.grad_accum=0", "'train.grad_accum': must be >= 1"),
    ("ray.num_workers=0", "'ray.num_workers': must be >= 1"),
    ("optim.lr=-1", "'optim.lr': must be > 0"),
    ("data.train_shards=", "'data.train_shards': is empty"),
    ("name=a/b", "'name': must be a plain directory name"),
    # never a local folder named 's3:/bkt/runs' (more in test_storage.py)
    ("output_dir=s3:/bkt/runs", "'output_dir': = 's3:/bkt/runs' looks like a URI that lost a '/'"),
])
def test_impossible_training_values_name_the_key(override, message):
    from ddetr_dist.config import check_training_config

    cfg = load_config(None, ["data.train_shards=x", override])
    with pytest.raises(ConfigError) as error:
        check_training_config(cfg)
    assert message in str(error.value)


def test_config_round_trips_through_a_dict():
    from ddetr_dist.config import config_from_dict, to_dict

    cfg = load_config(CONFIGS / "demo.yaml", ["train.zero_stage=2", "ray.use_gpu=false"])
    assert config_from_dict(to_dict(cfg)) == cfg


FROM_SCRATCH = ["model.backbone_norm=bn", "model.backbone_frozen_stages=0"]


@pytest.mark.parametrize("overrides, frozen", [
    ([], "model.backbone_norm=frozen_bn and model.backbone_frozen_stages=2"),  # the defaults
    (["model.backbone_norm=bn"], "model.backbone_frozen_stages=2"),
    (["model.backbone_frozen_stages=0"], "model.backbone_norm=frozen_bn"),
])
def test_a_frozen_backbone_without_weights_is_refused(overrides, frozen):
    """Frozen BatchNorm and frozen stages keep ImageNet weights while fine-tuning: on a
    random backbone they would train around a random stem (issue 12, bug 10)."""
    from ddetr_dist.config import check_training_config

    with pytest.raises(ConfigError) as error:
        check_training_config(load_config(None, ["data.train_shards=x", *overrides]))
    message = str(error.value)
    assert "config key 'model.backbone_weights'" in message and frozen in message
    assert "model.backbone_norm=bn model.backbone_frozen_stages=0" in message  # what to write instead


@pytest.mark.parametrize("overrides", [FROM_SCRATCH, ["model.backbone_weights=resnet50.pth"],
                                       ["model.backbone_weights=resnet50.pth", "model.backbone_frozen_stages=5"]])
def test_a_backbone_from_scratch_or_from_weights_is_accepted(overrides):
    from ddetr_dist.config import check_training_config

    check_training_config(load_config(None, ["data.train_shards=x", *overrides]))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_passes_the_training_checks(path):
    from ddetr_dist.config import check_training_config

    cfg = load_config(path)
    check_training_config(cfg)
    # a frozen backbone only with weights to keep; the official recipe fine-tunes ImageNet's
    assert cfg.model.backbone_weights or (cfg.model.backbone_norm, cfg.model.backbone_frozen_stages) == ("bn", 0)


def test_override_grammar_is_a_dotted_key_then_equals():
    from ddetr_dist.config import is_override

    assert is_override("model.hidden_dim=128") and is_override("seed=3") and is_override("data.train_shards=")
    assert not any(map(is_override, ["photos/", "a.jpg", "./b=c.jpg", "dir/x.y=1.png", "=3", "model..x=1"]))


def test_the_typed_reader_reads_any_dataclass_naming_the_key():
    """Sweep files are read by the same reader as config files (read_into)."""
    from dataclasses import dataclass, field
    from typing import Optional

    from ddetr_dist.config import read_into

    @dataclass
    class Spec:
        seed: Optional[int] = None
        points: list[dict] = field(default_factory=list)
        rate: float = 1.0
        raw: dict = field(default_factory=dict, init=False)  # the program's own: not a key

    assert read_into(Spec(), {"seed": 3, "points": [{"a": 1}], "rate": "1e-3"}) == Spec(3, [{"a": 1}], 1e-3)
    assert read_into(Spec(), None) == Spec()  # an empty section
    for values, message in [({"sed": 1}, "unknown key 'spec.sed'. Did you mean 'seed'?"),
                            ({"raw": {}}, "unknown key 'spec.raw'"),
                            ({"seed": "x"}, "key 'spec.seed': expected an integer or null, got 'x'"),
                            ({"points": [3]}, "key 'spec.points[0]': expected a mapping, got 3"),
                            ({"rate": "fast"}, "key 'spec.rate': expected float")]:
        with pytest.raises(ConfigError) as error:
            read_into(Spec(), values, "spec", label="key")
        assert message in str(error.value)


@pytest.mark.parametrize("output_dir", ["runs", "/shared/runs", "~/runs", "./s3-copies/runs", "runs:2026",
                                        "s3://bkt/runs", "gs://bkt/runs"])
def test_file_system_and_object_storage_output_dirs_are_accepted(output_dir):
    from ddetr_dist.config import check_training_config

    check_training_config(load_config(None, ["data.train_shards=x", f"output_dir={output_dir}", "model.backbone_norm=bn",
                                             "model.backbone_frozen_stages=0"]))
