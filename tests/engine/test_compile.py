"""train.compile (engine/compile.py): compiled training gives eager's losses, compilations
stay within the shape buckets' bound, ZeRO-3 is refused before any worker starts, and the
compiled code is kept in the node-local inductor cache (a second run of these tests loads
it: the first run on a machine compiles the tiny model once, about a minute on 2 cores)."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from ddetr_dist.config import ConfigError, check_training_config, load_config, pad_multiple
from ddetr_dist.data.collate import collate
from ddetr_dist.engine import compile as compile_mod
from ddetr_dist.engine.metrics import read_metrics

from .conftest import SQUARE_OVERRIDES
from .engine_helpers import TINY_OVERRIDES

STEPS = 20


def train_losses(cfg, run_dir) -> list[float]:
    from ddetr_dist.engine.checkpointers import FolderCheckpointer
    from ddetr_dist.engine.loop import Trainer
    from ddetr_dist.engine.run_dir import RunDir

    run_dir.mkdir(parents=True)
    trainer = Trainer(cfg, RunDir(run_dir), FolderCheckpointer(RunDir(run_dir)))
    trainer.fit()
    return [r["loss"] for r in read_metrics(run_dir) if r.get("event") == "train"]


# bf16 rounds to 2**-8 (3.9e-3): compiled code, which fuses ops and rounds the fused result
# once, differs from eager's op-by-op rounding at the first step already (1.6e-4 measured) and
# by 2.8e-3 after 20 steps (1.2e-3 with inductor's emulate_precision_casts)
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_training_gives_eager_losses_and_logs_its_compilations(precision, square_data, tmp_path,
                                                                         one_process):
    """20 steps, eager and compiled, on the same padded batches (96x96 images -> 128x128):
    the same losses (fp32 to 1e-4; dropout 0: inductor draws its own random masks); one
    compilation (one shape bucket), logged with its bound; the compiled code in the inductor cache."""
    cfg = load_config(None, TINY_OVERRIDES + SQUARE_OVERRIDES + [
        f"data.train_shards={square_data}", f"output_dir={tmp_path}", f"train.max_steps={STEPS}",
        "model.dropout=0", "data.pad_to_multiple=64", "train.async_checkpoint=false",
        f"train.precision={precision}"])
    torch.set_num_threads(2)
    eager = train_losses(cfg, tmp_path / "eager")
    compiled_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=True))
    before = compile_mod.compilations()
    compiled = train_losses(compiled_cfg, tmp_path / "compiled")
    assert len(eager) == len(compiled) == STEPS
    tolerance = LOSS_TOLERANCE[precision]
    assert compiled == pytest.approx(eager, rel=tolerance, abs=tolerance)
    assert compile_mod.compilations() - before == 1  # one bucket: 128x128
    records = read_metrics(tmp_path / "compiled")
    [compile_record] = [r for r in records if r.get("event") == "compile"]
    assert compile_record["shape"] == [128, 128] and compile_record["step"] == 1
    assert compile_record["bound"] == compile_mod.compile_bound(compiled_cfg) == 4  # ceil(96 / 64) ** 2
    cache = compile_mod.inductor_cache_dir()
    assert any(cache.rglob("*")), f"nothing cached in {cache}"


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, images):
        return self.conv(images).relu()


def test_compilations_stay_within_the_shape_buckets(one_process):
    """Random image sizes up to data.max_size, padded to multiples of 64: a compiled model
    compiles once per (height, width) bucket, at most ceil(max_size / 64) ** 2, however many
    sizes it sees (unpadded, every size would compile)."""
    cfg = load_config(None, ["data.max_size=128", "train.compile=true"])
    assert pad_multiple(cfg) == 64 and compile_mod.compile_bound(cfg) == 4
    rng = random.Random(0)
    compile_mod.use_inductor_cache()
    model = SmallNet()  # a module of ours: dynamo does not compile torch's own (nn.Sequential)
    model.compile(backend="inductor", dynamic=False)
    before, sizes = compile_mod.compilations(), set()
    for _ in range(12):
        samples = [(torch.randn(3, rng.randint(33, 128), rng.randint(33, 128)), {}) for _ in range(2)]
        sizes.update(tuple(image.shape[1:]) for image, _ in samples)
        images, mask, _ = collate(samples, pad_multiple(cfg))
        assert images.shape[-2] % 64 == 0 and images.shape[-1] % 64 == 0
        model(images).sum().backward()
    assert len(sizes) > compile_mod.compile_bound(cfg)
    assert 1 <= compile_mod.compilations() - before <= compile_mod.compile_bound(cfg)


def test_collate_pads_to_a_multiple_and_marks_the_padding():
    images, mask, _ = collate([(torch.ones(3, 70, 40), {}), (torch.ones(3, 50, 90), {})], pad_to_multiple=64)
    assert images.shape == (2, 3, 128, 128) and mask.shape == (2, 128, 128)
    assert not mask[0, :70, :40].any() and mask[0, 70:].all() and mask[0, :, 40:].all()
    assert images[0].sum() == 3 * 70 * 40 and images[1].sum() == 3 * 50 * 90
    assert collate([(torch.ones(3, 70, 40), {})])[0].shape == (1, 3, 70, 40)  # no multiple: as before


def test_zero3_with_compile_is_refused_naming_the_keys_and_what_to_use():
    cfg = load_config(None, ["data.train_shards=x", "model.backbone_weights=w.pth", "train.compile=true",
                             "train.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"'train.compile' \(true\) and 'train.zero_stage' \(3\).*"
                                          r"train.zero_stage=2.*train.compile=false"):
        check_training_config(cfg)
    for stage in (0, 1, 2):  # allowed
        check_training_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, zero_stage=stage)))
    with pytest.raises(ConfigError, match="data.pad_to_multiple"):
        check_training_config(load_config(None, ["data.train_shards=x", "model.backbone_weights=w.pth",
                                                 "data.pad_to_multiple=-1"]))


def test_padding_defaults_to_64_only_when_compiling():
    assert pad_multiple(load_config(None, [])) == 1
    assert pad_multiple(load_config(None, ["train.compile=true"])) == 64
    assert pad_multiple(load_config(None, ["train.compile=true", "data.pad_to_multiple=0"])) == 1
    assert pad_multiple(load_config(None, ["data.pad_to_multiple=32"])) == 32


def test_the_inductor_cache_is_node_local(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_mod.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_mod.inductor_cache_dir() == tmp_path / "ddetr_dist" / "inductor"
    monkeypatch.setenv(compile_mod.CACHE_ENV, str(tmp_path / "mine"))  # a user's own choice wins
    assert compile_mod.use_inductor_cache() == tmp_path / "mine"
    assert (tmp_path / "mine").is_dir()
