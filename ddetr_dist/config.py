"""One typed config tree for the whole system.

A run is described by `Config`, a tree of dataclasses. It is loaded from a YAML file in
`configs/` (which may name a `base:` file it extends) and then overridden from the command
line with `section.key=value`. Every key is checked against the tree: an unknown key raises
`ConfigError` naming it, the keys valid at that place, and the nearest match; a value of
the wrong type names the key and the expected type. The same typed reader (`read_into`)
reads sweep files (on_ray/sweep_file.py).
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ddetr_dist.atomic import atomic_write_bytes
from ddetr_dist.storage import StoreError, check_scheme, is_uri, mangled_uri

REPO = Path(__file__).resolve().parent.parent  # the checkout (or the job's working_dir)
DEMO_CONFIG = REPO / "configs" / "demo.yaml"  # what the commands use without --config
AUTO = "auto"  # model.num_classes: from the train data
COCO_NUM_CLASSES = 91  # the official model's: COCO's category ids go up to 90
log = logging.getLogger("ddetr_dist.config")


class ConfigError(ValueError):
    """A config file or override names an unknown key or carries a bad value."""


@dataclass
class ModelConfig:
    """The detector (defaults: the official Deformable DETR, ResNet-50; the number of classes
    from the train data)."""

    backbone_depth: int = 50  # ResNet depth: 18, 34, 50 or 101
    dilation: bool = False  # dilate the last ResNet stage (DC5)
    # 'frozen_bn': fixed (ImageNet) statistics, the official fine-tuning recipe; 'bn': trainable
    # BatchNorm, for training the backbone from scratch
    backbone_norm: str = "frozen_bn"
    backbone_frozen_stages: int = 2  # leading ResNet stages not trained: 0 none, 1 stem, 2 + layer1 (official), .. 5 all
    lr_backbone_names: tuple[str, ...] = ("backbone.0",)
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    num_feature_levels: int = 4  # 1 = the single-scale variant
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300
    # category ids are the labels (COCO's are sparse): max id + 1 (91 for COCO). 'auto' = that
    # number from the train manifest, resolved by `ddetr train` and written to the run's config.yaml
    num_classes: Union[int, Literal["auto"]] = AUTO
    aux_loss: bool = True
    with_box_refine: bool = False
    two_stage: bool = False
    position_embedding_scale: float = 6.283185307179586  # 2*pi
    activation_checkpointing: bool = False  # recompute encoder/decoder layers in backward
    msda_backend: Optional[str] = None  # None = automatic; 'cuda', 'cpu' or 'torch'
    backbone_weights: str = ""  # torchvision ResNet checkpoint (.pth) to start from; '' = random init
    # fine-tuning: a new run starts from these weights (a released {'model': state_dict} .pth, a
    # model_final.pth, a run directory: its newest checkpoint, or one checkpoint folder); class
    # heads of another number of classes are re-initialised, anything else must fit. Not needed
    # nor read: backbone_weights. A resumed run (same name) takes its own checkpoint instead
    init_checkpoint: str = ""


@dataclass
class LossConfig:
    """Hungarian matcher costs and loss weights (the official recipe)."""

    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed and transformed."""

    train_shards: str = ""  # path, brace pattern or URL; '' = none
    val_shards: str = ""
    train_manifest: str = ""  # '' = manifest.json beside the train shards (set it for pipe: URLs)
    val_manifest: str = ""  # '' = manifest.json beside the val shards
    val_annotations: str = ""  # COCO annotation file for evaluation; '' = the val shards' own records
    allow_pipe_urls: bool = False  # `pipe:` URLs run shell commands: off unless enabled
    batch_size: int = 2  # per rank
    num_workers: int = 2  # loader worker processes per rank
    shuffle_buffer: int = 500
    samples_per_epoch: int = 0  # per epoch over all ranks; 0 = the manifest's count
    train_scales: tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    val_scale: int = 800
    max_size: int = 1333
    crop_scales: tuple[int, ...] = (400, 500, 600)  # random resize-crop branch
    crop_min_size: int = 384
    crop_max_size: int = 600
    # pad each training batch's height and width up to a multiple of this (the padding mask
    # marks it): few distinct shapes, so that a compiled model (train.compile) compiles once per
    # shape bucket rather than once per random size. Evaluation and prediction pad theirs the
    # same (a model learns its padding; model_final.pth records it). null = 64 with
    # train.compile, else none; 0 or 1 = none (docs/training.md, "Compiled training")
    pad_to_multiple: Optional[int] = None


@dataclass
class OptimConfig:
    """AdamW with the official parameter groups and a step schedule (the official recipe)."""

    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1  # sampling_offsets and reference_points train at lr x this
    weight_decay: float = 1e-4
    epochs: int = 50
    lr_drop: int = 40  # lr x lr_drop_factor from this epoch on
    lr_drop_factor: float = 0.1
    clip_max_norm: float = 0.1  # 0 = no clipping
    warmup_steps: int = 0  # linear warm-up from 0 over this many optimizer steps


@dataclass
class TrainConfig:
    """The train loop in each worker."""

    max_steps: int = 0  # optimizer steps in all; 0 = run optim.epochs
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast; parameters and optimizer stay fp32)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3 (one worker runs ZeRO-1/2 as 0: nothing to partition)
    grad_accum: int = 1  # micro-batches per optimizer step
    loss_scale_power: int = 16  # fp16: the dynamic loss scale starts at 2**this
    loss_scale_window: int = 1000  # fp16: steps without overflow before the loss scale doubles
    checkpoint_every_steps: int = 0  # 0 = at each epoch end only
    # write a checkpoint in a background thread: the loop waits only for a CPU copy of the state
    # (false: the loop waits until the files are written and registered)
    async_checkpoint: bool = True
    log_every_steps: int = 10
    max_bad_steps: int = 5  # consecutive non-finite losses/gradients before the run aborts
    eval_every_epochs: int = 1  # COCO evaluation on data.val_shards; 0 = only at the end
    pictures: int = 4  # val images drawn with their predictions at each evaluation (0 = none)
    picture_threshold: float = 0.3  # detections drawn: score at least this
    # torch.compile (inductor) the model inside the DeepSpeed engine, forward and backward, on
    # every rank: faster steps after a compile per batch shape (data.pad_to_multiple bounds them);
    # ZeRO-0/1/2, fp32/bf16 (fp16: ZeRO-0); evaluation stays eager (docs/training.md)
    compile: bool = False


WORKER_RANGE = re.compile(r"\s*\d+\s*(-\s*\d+\s*)?")  # ray.num_workers as text: '2' or '2-4'


@dataclass
class RayConfig:
    """Where and how wide the run is."""

    address: str = ""  # '' = RAY_ADDRESS, else a local Ray started for this run (127.0.0.1)
    # training processes (one per GPU on a GPU cluster): a number, or a range '2-4' / [2, 4]:
    # elastic, as many as the cluster holds within it, fewer after a node is lost, more when
    # capacity returns (docs/elastic.md)
    num_workers: Union[int, str, tuple[int, ...]] = 2
    use_gpu: Optional[bool] = None  # None = use GPUs when the cluster has them
    cpus_per_worker: int = 1  # also the torch threads of each worker
    max_failures: int = 3  # worker-group restarts from the last checkpoint before giving up
    keep_checkpoints: int = 2  # newest checkpoints kept in the run directory
    # SIGTERM (to the driver or a worker): seconds the workers may take to save a checkpoint at
    # their next step before the process ends anyway; 0 = end at once (docs/preemption.md)
    save_on_sigterm_s: float = 60.0
    # a range of workers: how often Ray looks for room for more (a resize restarts the workers
    # from the last checkpoint; Ray's view of the nodes is itself refreshed every 20 s)
    resize_check_s: float = 60.0

    def __post_init__(self):
        self.worker_range()  # a malformed ray.num_workers fails where it is read, naming the key

    def worker_range(self) -> tuple[int, int]:
        """`num_workers` as (fewest, most): (2, 2) for 2; (2, 4) for '2-4' or [2, 4]. A value
        that is neither raises ConfigError naming the key."""
        value = self.num_workers
        if isinstance(value, str) and WORKER_RANGE.fullmatch(value):
            low, _, high = value.partition("-")
            value = (int(low), int(high or low))
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value, value)
        if not (isinstance(value, (tuple, list)) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise ConfigError(f"config key 'ray.num_workers': expected a number of workers (2) or a range of them "
                              f"(2-4, or [2, 4]), got {self.num_workers!r}")
        return int(value[0]), int(value[1])

    def is_elastic(self) -> bool:
        """A range of workers (not one number): Ray resizes the run as nodes come and go."""
        low, high = self.worker_range()
        return low != high


@dataclass
class Config:
    """The root of the tree."""

    name: str = "run"  # run name: the run directory is <output_dir>/<name>; same name resumes
    output_dir: str = "runs"  # a path every node sees, or object storage: s3://bucket/prefix (docs/object-storage.md)
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# ---------------------------------------------------------------- loading and checking


def _fields(cls) -> dict[str, Any]:
    """The keys a file may set: the dataclass's fields (init=False ones are the program's own)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def did_you_mean(word: str, choices) -> str:
    """' Did you mean 'x'?' for the closest of `choices`, or '' when none is close."""
    near = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" Did you mean '{near[0]}'?" if near else ""


def check_keys(values: Any, valid, path: str = "", label: str = "config key") -> dict:
    """`values` (None reads as {}) when it is a mapping of keys in `valid`; else the error
    naming the key (`path`.key, a `label`), the nearest valid key and all of them."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{repr(path) if path else 'the top level'} must be a mapping of {label}s, got {values!r}")
    for key in values:
        if key not in valid:
            raise ConfigError(f"unknown {label} '{path + '.' if path else ''}{key}'.{did_you_mean(key, valid)} "
                              f"Valid keys here: {', '.join(sorted(map(str, valid)))}")
    return values


_NAMES = {bool: "true or false", int: "an integer", float: "float", str: "a string", tuple: "a list",
          list: "a list", dict: "a mapping"}


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is typing.Literal:
        return f"one of {', '.join(map(str, typing.get_args(tp)))}"
    return _NAMES.get(typing.get_origin(tp) or tp, str(tp))


def read_value(value: Any, tp: Any, where: str, label: str = "config key") -> Any:
    """`value` checked against the annotation `tp` (lists become tuples for tuple fields, ints
    floats for float ones, Literal[...] is a choice); a mismatch names the key `where`, a `label`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{label} '{where}': expected {_describe(tp)}, got {value!r}."
                          f"{did_you_mean(value, typing.get_args(tp))}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            try:
                if arg is not type(None):
                    return read_value(value, arg, where, label)
            except ConfigError:
                pass
    elif tp in (tuple, list) or origin in (tuple, list):
        if isinstance(value, (list, tuple)):
            item_tp = (typing.get_args(tp) or (Any,))[0]
            items = [read_value(v, item_tp, f"{where}[{i}]", label) for i, v in enumerate(value)]
            return tuple(items) if tuple in (tp, origin) else items
    elif tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads '1e-3' (no dot) as a string
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, origin or tp) and (tp is bool or not isinstance(value, bool)):
        return value
    raise ConfigError(f"{label} '{where}': expected {_describe(tp)}, got {value!r}")


def read_into(obj: Any, values: Any, path: str = "", label: str = "config key") -> Any:
    """A copy of dataclass `obj` with `values` (a nested mapping) applied: every key one of its
    fields, every value of the field's type, nested dataclasses from nested mappings. Config
    files, overrides and sweep files are all read by it."""
    fields = _fields(type(obj))
    changes = {}
    for key, value in check_keys(values, fields, path, label).items():
        where = f"{path}.{key}" if path else key
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = read_into(current, value, where, label)
        else:
            changes[key] = read_value(value, fields[key], where, label)
    return dataclasses.replace(obj, **changes)


def nested(dotted: str, value: Any) -> dict:
    """('model.hidden_dim', 128) -> {'model': {'hidden_dim': 128}}."""
    for part in reversed(dotted.strip().split(".")):
        value = {part: value}
    return value


OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")


def is_override(text: str) -> bool:
    """Whether a command-line item is a config override: 'section.key=value' (or 'key=value')."""
    return OVERRIDE.match(text) is not None


def parse_override(text: str) -> dict:
    """'model.hidden_dim=128' -> {'model': {'hidden_dim': 128}} (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    dotted, raw = text.split("=", 1)
    return nested(dotted, yaml.safe_load(raw) if raw.strip() else "")


def with_values(cfg: Config, values: dict) -> Config:
    """`cfg` with {dotted key: value} applied, each checked like a config file's."""
    for key, value in values.items():
        cfg = read_into(cfg, nested(key, value))
    return cfg


def dotted_keys(obj: Any, prefix: str = "") -> list[str]:
    """Every leaf key of a dataclass tree: ['name', ..., 'model.backbone_depth', ...]."""
    out = []
    for key in _fields(type(obj)):
        value = getattr(obj, key)
        out += dotted_keys(value, f"{prefix}{key}.") if dataclasses.is_dataclass(value) else [prefix + key]
    return out


def get_dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[dict]:
    """The YAML at `path` and the chain of `base:` files it extends, base first."""
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}. Pass a YAML file (see configs/).")
    if path in seen:
        raise ConfigError(f"config file {path} extends itself through 'base:'")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    base = data.pop("base", None)
    chain = _read_yaml(path.parent / base, seen + (path,)) if base else []
    return chain + [data]


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file (and its bases), then `section.key=value` overrides."""
    cfg = Config()
    for layer in _read_yaml(Path(path)) if path else []:
        cfg = read_into(cfg, layer)
    return with_overrides(cfg, overrides)


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`cfg` with `section.key=value` overrides applied in order."""
    for text in overrides:
        cfg = read_into(cfg, parse_override(text))
    return cfg


PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_PAD_MULTIPLE = 64  # data.pad_to_multiple's default with train.compile


def pad_multiple(cfg: Config) -> int:
    """What training batches are padded to a multiple of (1 = none): data.pad_to_multiple, or
    by default COMPILE_PAD_MULTIPLE when the model is compiled. Evaluation and prediction pad
    theirs the same: a model learns the padding it trained with (the demo trained on batches
    padded to 64 scored AP50 0.586 on val batches padded alike, 0.424 on unpadded ones)."""
    multiple = cfg.data.pad_to_multiple
    if multiple is None:
        multiple = COMPILE_PAD_MULTIPLE if cfg.train.compile else 1
    return max(1, multiple)


def check_compile(cfg: Config) -> None:
    """train.compile with what it cannot run with: fail before any worker starts."""
    if cfg.train.compile and cfg.train.zero_stage == 3:
        raise ConfigError("config keys 'train.compile' (true) and 'train.zero_stage' (3): a compiled model runs "
                          "with ZeRO-0, 1 or 2 only (ZeRO-3 keeps each parameter partitioned, an empty tensor "
                          "outside DeepSpeed's hooks, which torch.compile cannot trace). Use train.zero_stage=2 "
                          "(gradients and optimizer state partitioned) with train.compile=true, or "
                          "train.compile=false with ZeRO-3.")
    if cfg.data.pad_to_multiple is not None and cfg.data.pad_to_multiple < 0:
        raise ConfigError(f"config key 'data.pad_to_multiple': must be >= 0 (0 = no padding), got "
                          f"{cfg.data.pad_to_multiple}")


def check_training_config(cfg: Config) -> None:
    """Values that are well typed but impossible for a training run: fail before any
    worker starts, naming the key and what to do."""
    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}': {message}")

    t, o, r, d = cfg.train, cfg.optim, cfg.ray, cfg.data
    need(bool(cfg.name) and "/" not in cfg.name and cfg.name not in (".", ".."), "name",
         f"must be a plain directory name, got {cfg.name!r}")
    # taken as a path, 's3:/bkt/runs' (a URI whose '//' a shell or path join lost) would train
    # into a local folder of that name and leave the bucket empty
    need(not mangled_uri(cfg.output_dir), "output_dir",
         f"= {cfg.output_dir!r} looks like a URI that lost a '/' after its scheme: write "
         f"{cfg.output_dir.replace(':/', '://', 1)!r} for object storage, or give a path")
    if is_uri(cfg.output_dir):  # reaching it is the driver's check (on_ray/driver.py)
        try:
            check_scheme(cfg.output_dir)
        except StoreError as e:
            raise ConfigError(f"config key 'output_dir': {e}") from None
    need(t.precision in PRECISIONS, "train.precision", f"must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    need(0 <= t.zero_stage <= 3, "train.zero_stage", f"must be 0, 1, 2 or 3, got {t.zero_stage}")
    check_compile(cfg)
    for key in ("grad_accum", "log_every_steps", "max_bad_steps"):
        need(getattr(t, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    for key in ("max_steps", "checkpoint_every_steps", "eval_every_epochs", "pictures"):
        need(getattr(t, key) >= 0, f"train.{key}", f"must be >= 0 (0 = off), got {getattr(t, key)}")
    need(o.epochs >= 1, "optim.epochs", f"must be >= 1, got {o.epochs}")
    need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    for key in ("lr_backbone", "lr_linear_proj_mult", "weight_decay", "clip_max_norm", "warmup_steps", "lr_drop"):
        need(getattr(o, key) >= 0, f"optim.{key}", f"must be >= 0, got {getattr(o, key)}")
    fewest, most = r.worker_range()
    need(fewest >= 1, "ray.num_workers", f"must be >= 1, got {r.num_workers}")
    need(most >= fewest, "ray.num_workers", f"= {r.num_workers!r}: a range goes from the fewest workers to the "
         f"most, e.g. {most}-{fewest}")
    need(r.resize_check_s > 0, "ray.resize_check_s", f"must be > 0 (seconds), got {r.resize_check_s}")
    need(r.cpus_per_worker >= 1, "ray.cpus_per_worker", f"must be >= 1, got {r.cpus_per_worker}")
    need(r.max_failures >= -1, "ray.max_failures", f"must be >= 0 (-1 = retry forever), got {r.max_failures}")
    need(r.keep_checkpoints >= 1, "ray.keep_checkpoints", f"must be >= 1, got {r.keep_checkpoints}")
    need(r.save_on_sigterm_s >= 0, "ray.save_on_sigterm_s", f"must be >= 0 (seconds; 0 = no save), got {r.save_on_sigterm_s}")
    need(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    need(bool(d.train_shards), "data.train_shards", "is empty: point it at the training shards "
         "(a directory with manifest.json, a brace pattern or a URL; `ddetr shard` writes them)")
    # Frozen BatchNorm and frozen stages keep ImageNet statistics and filters while fine-tuning
    # them; without those weights they would keep a random stem and identity normalisation.
    # An init_checkpoint brings its own backbone (backbone_weights would be overwritten)
    m = cfg.model
    frozen = []
    if m.backbone_norm == "frozen_bn":
        frozen.append(f"model.backbone_norm={m.backbone_norm}")
    if m.backbone_frozen_stages > 0:
        frozen.append(f"model.backbone_frozen_stages={m.backbone_frozen_stages}")
    need(bool(m.backbone_weights or m.init_checkpoint) or not frozen, "model.backbone_weights",
         f"is empty (a random backbone), but {' and '.join(frozen)} would keep parts of it as initialised: frozen "
         "BatchNorm and frozen stages are for fine-tuning ImageNet weights. Give them (a torchvision ResNet .pth, "
         "e.g. https://download.pytorch.org/models/resnet50-0676ba61.pth), or train the backbone from scratch: "
         "model.backbone_norm=bn model.backbone_frozen_stages=0 (or fine-tune a whole detector: "
         "model.init_checkpoint=)")


def with_num_classes(cfg: Config, needed: int, where: str = "the train manifest") -> Config:
    """`cfg` with model.num_classes fitted to data whose labels need `needed` classes (max
    category id + 1): 'auto' becomes `needed`; fewer fail (a label past the heads would end
    the run at its first batch); far more only warn (the extra heads never see a positive:
    compute spent on nothing, e.g. a 91-class COCO config fine-tuned on 3 classes)."""
    value = cfg.model.num_classes
    if value == AUTO:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=needed))
    if value < needed:
        raise ConfigError(f"config key 'model.num_classes' = {value}, but {where}'s category ids go up to "
                          f"{needed - 1}: needs at least {needed}; set model.num_classes=auto")
    if value > 2 * needed and value > needed + 10:
        log.warning("config key 'model.num_classes' = %d, but %s's category ids go up to %d: %d class outputs "
                    "never see an example; model.num_classes=auto makes it %d", value, where, needed - 1,
                    value - needed, needed)
    return cfg


def config_from_dict(values: dict) -> Config:
    """The inverse of `to_dict` (checked like a YAML file)."""
    return read_into(Config(), values)


def to_dict(cfg: Config) -> dict:
    """A plain nested dict (tuples as lists) that round-trips through YAML and load_config."""

    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return {k: (to_dict(v) if dataclasses.is_dataclass(v) else plain(v))
            for k, v in ((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg))}


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_bytes(path, config_to_yaml(cfg).encode())
