"""A trained model from whatever a user points at: a released official checkpoint, our
`model_final.pth`, a run directory (its newest checkpoint), or one checkpoint directory;
with the config it was trained with when that can be found beside it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ddetr_dist.config import Config, ConfigError, load_config
from ddetr_dist.engine.portable import PORTABLE
from ddetr_dist.engine.run_dir import RAY_CHECKPOINT_PREFIX, RunDir
from ddetr_dist.engine.run_store import local_copy, newest_checkpoint
from ddetr_dist.engine.train_state import META
from ddetr_dist.models import build_model, load_official_checkpoint
from ddetr_dist.models.checkpoint import model_state_dict, read_checkpoint
from ddetr_dist.models.convert import METADATA_KEY, TRAINED_PADDING_KEY, model_config_of
from ddetr_dist.storage import is_uri


def resolve_weights(path: str | Path) -> tuple[Path, Path | None]:
    """-> (the weights file, the run directory it belongs to or None). A URI (object
    storage) is fetched into this node's working copy first (engine/run_store.py)."""
    if is_uri(path):
        path = local_copy(path)
    path = Path(path)
    if path.is_dir():
        if (path / PORTABLE).is_file():  # one checkpoint folder
            return path / PORTABLE, _run_dir_above(path)
        newest = newest_checkpoint(path)
        if newest is not None:
            return newest / PORTABLE, path
        final = RunDir(path).final_model
        if final.is_file():
            return final, path
        raise FileNotFoundError(f"{path}: a directory without checkpoints (no {RAY_CHECKPOINT_PREFIX}*/ with {META} "
                                f"and {PORTABLE}, no {final.name}); point --checkpoint at a run directory or a .pth")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path, _run_dir_above(path)


def _run_dir_above(path: Path) -> Path | None:
    run_dir = RunDir.above(path)
    return run_dir.path if run_dir is not None else None


def load_trained(checkpoint: str | Path, config: str | None, overrides: list[str], default_config: Path):
    """-> (cfg, model in eval mode, criterion, postprocess, weights file). The config: --config,
    else the run's own config.yaml, else `default_config`; the model's shape always comes
    from the checkpoint itself, and so does the padding of its batches (see with_trained_padding)."""
    weights, run_dir = resolve_weights(checkpoint)
    if config is None and run_dir is not None:
        config = RunDir(run_dir).config
    cfg: Config = load_config(config or default_config, overrides)
    ckpt = read_checkpoint(weights)
    model_cfg = model_config_of(ckpt, model_state_dict(ckpt, weights), cfg.model)
    cfg = with_trained_padding(dataclasses.replace(cfg, model=model_cfg), ckpt, overrides)
    del ckpt
    try:
        model, criterion, postprocess = build_model(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    load_official_checkpoint(weights, model)
    return cfg, model.eval(), criterion, postprocess, weights


def with_trained_padding(cfg: Config, ckpt: dict, overrides: list[str]) -> Config:
    """`cfg` padding its batches as the checkpoint's training did (model_final.pth records
    config.pad_multiple: a model learns its padding), unless an override sets
    data.pad_to_multiple. A file without the record (official, converted, a checkpoint
    folder's portable.pt) keeps the config's: its run's config.yaml when beside it."""
    trained = (ckpt.get(METADATA_KEY) or {}).get(TRAINED_PADDING_KEY)
    if trained is None or any(o.split("=", 1)[0].strip() == "data.pad_to_multiple" for o in overrides):
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pad_to_multiple=int(trained)))


def category_names(cfg: Config) -> dict[int, str]:
    """{category id: name} from the manifest of the config's val (else train) shards; {} if none reads."""
    from ddetr_dist.data import load_shard_set

    for spec, manifest in ((cfg.data.val_shards, cfg.data.val_manifest), (cfg.data.train_shards, cfg.data.train_manifest)):
        if spec:
            try:
                return {c["id"]: c["name"] for c in load_shard_set(spec, cfg.data.allow_pipe_urls, manifest).categories}
            except (FileNotFoundError, ValueError):
                continue
    return {}
