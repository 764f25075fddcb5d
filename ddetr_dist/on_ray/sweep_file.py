"""The sweep file of `ddetr tune`, read and checked before Ray starts.

It names the search space as dotted config keys with a domain each, the search algorithm,
the early-stopping scheduler, how many trials and how wide each one is:

    name: lr_points                  # default: the file's name
    metric: AP                       # AP, AP50, ..., AR100 (max) or val_loss (min)
    num_samples: 8
    space:
      optim.lr: {loguniform: [1.0e-5, 1.0e-3]}
      model.dec_n_points: {choice: [2, 4]}
    search: {algorithm: random, seed: 0}
    scheduler: {type: asha, time_attr: epoch, grace_period: 1, reduction_factor: 2}
    resources: {workers_per_trial: 2, cpus_per_worker: 1}

Every value a trial can get (each grid_search/choice value, each range bound, each
point_to_evaluate) goes through the config's own checks against the base config, so a
search-space key that is not a config key, or a value the key refuses, fails here naming
the key and the file.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ddetr_dist.config import Config, ConfigError, check_training_config, config_from_dict, did_you_mean, to_dict

# domain -> what its YAML list holds (Tune's functions of the same name)
DOMAINS = {
    "grid_search": "values, each tried once per sample",
    "choice": "values, one drawn per trial",
    "uniform": "[low, high]",
    "quniform": "[low, high, q]",
    "loguniform": "[low, high], low > 0",
    "qloguniform": "[low, high, q], low > 0",
    "randint": "[low, high), integers",
}
ALGORITHMS = ("random", "grid", "optuna")
SCHEDULERS = ("fifo", "asha")
TIME_ATTRS = ("epoch", "step")  # what the workers report with every checkpoint
EVAL_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "val_loss")  # reported after an evaluation
SET_BY_THE_SWEEP = ("name", "output_dir")  # each trial's own
# the same for every trial: the sweep places trials by them
PER_SWEEP = {"ray.num_workers": "resources.workers_per_trial", "ray.cpus_per_worker": "resources.cpus_per_worker",
             "ray.use_gpu": "resources.use_gpu", "ray.address": "an override"}


@dataclass(frozen=True)
class Domain:
    kind: str  # a key of DOMAINS
    args: tuple  # the values (grid_search, choice) or the bounds (and q)


@dataclass
class SearchSpec:
    algorithm: str = "random"  # random and grid: Tune's BasicVariantGenerator; optuna: OptunaSearch
    seed: Optional[int] = None  # for reproducible draws
    points_to_evaluate: list = field(default_factory=list)  # [{dotted key: value}], run first, in order


@dataclass
class SchedulerSpec:
    type: str = "fifo"  # fifo: every trial runs to its end; asha: early stopping
    time_attr: str = "epoch"  # epochs completed, or optimizer steps
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int = 0  # rungs lie strictly below it; 0 = the run's length (optim.epochs / train.max_steps)


@dataclass
class ResourcesSpec:
    workers_per_trial: Optional[int] = None  # ray.num_workers of every trial; None = the config's
    cpus_per_worker: Optional[int] = None  # ray.cpus_per_worker; None = the config's
    use_gpu: Optional[bool] = None  # ray.use_gpu; None = the config's (GPUs when the cluster has them)
    max_concurrent_trials: int = 0  # 0 = as many as the cluster can place at once


@dataclass
class Sweep:
    name: str
    path: Path
    space: dict  # dotted config key -> Domain
    metric: str = "AP"
    mode: str = "max"
    num_samples: int = 1
    search: SearchSpec = field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    raw: dict = field(default_factory=dict)  # the file as read: a resumed sweep must match it


SECTIONS = {"name", "metric", "mode", "num_samples", "space", "search", "scheduler", "resources"}


class _Reader:
    """Checks one sweep file; every error names the file."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"sweep file {self.path}: {message}")

    def known_keys(self, where: str, values: Any, valid) -> dict:
        if values is None:
            return {}
        if not isinstance(values, dict):
            raise self.fail(f"'{where}' must be a mapping, got {values!r}")
        for key in values:
            if key not in valid:
                raise self.fail(f"unknown key '{where + '.' if where else ''}{key}'.{did_you_mean(key, valid)} "
                                f"Valid keys here: {', '.join(sorted(valid))}")
        return values

    def section(self, cls, where: str, values: Any):
        """A dataclass section: known keys, each value of its annotated type."""
        hints = typing.get_type_hints(cls)
        out = cls()
        for key, value in self.known_keys(where, values, hints).items():
            kinds = [k for k in typing.get_args(hints[key]) if k is not type(None)] or [hints[key]]
            optional = type(None) in typing.get_args(hints[key])
            if value is None and optional:
                setattr(out, key, None)
            elif kinds[0] is list:
                if not isinstance(value, list):
                    raise self.fail(f"'{where}.{key}': expected a list, got {value!r}")
                setattr(out, key, value)
            else:
                setattr(out, key, self.typed(f"{where}.{key}", value, kinds[0]))
        return out

    def typed(self, where: str, value: Any, kind: type) -> Any:
        if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return value
        raise self.fail(f"'{where}': expected {'true or false' if kind is bool else kind.__name__}, got {value!r}")


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += _dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return out


def get_dotted(cfg: Config, key: str) -> Any:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def with_values(cfg: Config, values: dict) -> Config:
    """`cfg` with {dotted key: value} applied, checked like a config file."""
    tree = to_dict(cfg)
    for key, value in values.items():
        _set_dotted(tree, key, value)
    return config_from_dict(tree)


class _SpaceChecker:
    """The search space's keys, and each value a trial can get tried in the base config:
    the config's own type checks, then the training checks (optim.lr > 0, ...)."""

    def __init__(self, reader: _Reader, base: Config):
        self.reader, self.base = reader, base
        self.keys = set(_dotted_keys(to_dict(base)))

    def key(self, key: str, where: str) -> None:
        """A leaf key of the config tree that trials may differ in; else the nearest one."""
        if key in SET_BY_THE_SWEEP:
            raise self.reader.fail(f"{where}: '{key}' is set by the sweep for each trial (the trial's name, "
                                   "<output_dir>/<sweep name>): it cannot be searched")
        if key in PER_SWEEP:
            raise self.reader.fail(f"{where}: '{key}' is the same for every trial (the sweep places trials by "
                                   f"it): set it with {PER_SWEEP[key]}")
        if key in self.keys:
            return
        section = key.rsplit(".", 1)[0] if "." in key else ""
        here = sorted(k for k in self.keys if k.rsplit(".", 1)[0] == section) if "." in key else []
        hint = did_you_mean(key, sorted(self.keys))
        listing = f" Keys of '{section}': {', '.join(k.rsplit('.', 1)[1] for k in here)}" if here else ""
        raise self.reader.fail(f"{where}: '{key}' is not a config key.{hint}{listing}")

    def value(self, key: str, value: Any, where: str) -> Any:
        """-> the value as the config types it ('1e-4' -> 1e-4, lists -> tuples)."""
        try:
            cfg = with_values(self.base, {key: value})
            check_training_config(cfg)
        except ConfigError as e:
            raise self.reader.fail(f"{where}: {e}") from None
        return get_dotted(cfg, key)

    def domain(self, key: str, spec: Any) -> Domain:
        where = f"space key '{key}'"
        self.key(key, "space")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise self.reader.fail(f"{where}: give one domain, e.g. {{choice: [2, 4]}} or {{loguniform: "
                                   f"[1.0e-5, 1.0e-3]}}; domains: {', '.join(DOMAINS)}. Fixed values are "
                                   "overrides on the command line (section.key=value)")
        ((kind, args),) = spec.items()
        if kind not in DOMAINS:
            raise self.reader.fail(f"{where}: unknown domain '{kind}'.{did_you_mean(kind, DOMAINS)} Domains: {', '.join(DOMAINS)}")
        if not isinstance(args, list) or not args:
            raise self.reader.fail(f"{where}: {kind} takes a list: {DOMAINS[kind]}")
        if kind in ("grid_search", "choice"):
            return Domain(kind, tuple(self.value(key, v, f"{where} ({kind} value {v!r})") for v in args))
        want = 3 if kind.startswith("q") else 2
        if len(args) != want:
            raise self.reader.fail(f"{where}: {kind} takes {DOMAINS[kind]}, got {args!r}")
        number = int if kind == "randint" else float
        bounds = tuple(self.reader.typed(f"{where} ({kind})", v, number) for v in args)
        low, high = bounds[:2]
        if not low < high:
            raise self.reader.fail(f"{where}: {kind} needs low < high, got {args!r}")
        if "loguniform" in kind and low <= 0:
            raise self.reader.fail(f"{where}: {kind} needs low > 0, got {low}")
        # both ends are values a trial may get (randint's high is excluded)
        for bound in (low, high - 1 if kind == "randint" else high):
            self.value(key, bound, f"{where} ({kind} bound {bound!r})")
        return Domain(kind, bounds)


def _default_mode(metric: str) -> str:
    return "min" if "loss" in metric else "max"


def run_length(cfg: Config, time_attr: str) -> Optional[int]:
    """The run's length in `time_attr` units, where the config alone says it."""
    if time_attr == "step":
        return cfg.train.max_steps or None
    return None if cfg.train.max_steps else cfg.optim.epochs


def load_sweep(path: str | Path, base: Config, name: str | None = None) -> Sweep:
    """Read and check the sweep file against the base config (defaults, file, overrides)."""
    path = Path(path)
    reader = _Reader(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path} (see configs/sweeps/)")
    raw = yaml.safe_load(path.read_text()) or {}
    reader.known_keys("", raw, SECTIONS)
    sweep_name = name or raw.get("name") or path.stem
    if not isinstance(sweep_name, str) or "/" in sweep_name or sweep_name in (".", ".."):
        raise reader.fail(f"'name' must be a plain directory name, got {sweep_name!r}")

    checker = _SpaceChecker(reader, base)
    space_raw = raw.get("space")
    if not isinstance(space_raw, dict) or not space_raw:
        raise reader.fail("'space' must map dotted config keys to domains, e.g. optim.lr: {loguniform: "
                          "[1.0e-5, 1.0e-3]}")
    space = {str(key): checker.domain(str(key), spec) for key, spec in space_raw.items()}

    metric = raw.get("metric", "AP")
    if metric not in EVAL_METRICS:
        raise reader.fail(f"'metric' {metric!r} is not reported by the workers.{did_you_mean(metric, EVAL_METRICS)} "
                          f"Choose one of {', '.join(EVAL_METRICS)}")
    if not base.data.val_shards:
        raise reader.fail(f"'metric' {metric} comes from evaluating data.val_shards, which the config leaves "
                          "empty: set data.val_shards")
    mode = raw.get("mode", _default_mode(metric))
    if mode not in ("min", "max"):
        raise reader.fail(f"'mode' must be min or max, got {mode!r}")
    num_samples = reader.typed("num_samples", raw.get("num_samples", 1), int)
    if num_samples < 1:
        raise reader.fail(f"'num_samples' must be >= 1, got {num_samples}")

    search = _search(reader, checker, raw.get("search"), space, num_samples)
    scheduler = _scheduler(reader, raw.get("scheduler"), base)
    resources = reader.section(ResourcesSpec, "resources", raw.get("resources"))
    for key in ("workers_per_trial", "cpus_per_worker"):
        if getattr(resources, key) is not None and getattr(resources, key) < 1:
            raise reader.fail(f"'resources.{key}' must be >= 1, got {getattr(resources, key)}")
    if resources.max_concurrent_trials < 0:
        raise reader.fail(f"'resources.max_concurrent_trials' must be >= 0 (0 = what the cluster holds), "
                          f"got {resources.max_concurrent_trials}")
    return Sweep(sweep_name, path, space, metric, mode, num_samples, search, scheduler, resources, raw)


def _search(reader: _Reader, checker: _SpaceChecker, values: Any, space: dict, num_samples: int) -> SearchSpec:
    spec = reader.section(SearchSpec, "search", values)
    if spec.algorithm not in ALGORITHMS:
        raise reader.fail(f"'search.algorithm' must be one of {', '.join(ALGORITHMS)}, got {spec.algorithm!r}")
    if spec.algorithm == "grid":
        ranges = [k for k, d in space.items() if d.kind not in ("grid_search", "choice")]
        if ranges:
            raise reader.fail(f"'search.algorithm' grid tries every value: {', '.join(ranges)} must be "
                              "grid_search or choice lists, not ranges")
    if spec.algorithm == "optuna":
        if importlib.util.find_spec("optuna") is None:
            raise reader.fail("'search.algorithm' optuna needs the optuna package (pip install -c constraints.txt "
                              "optuna), or use random")
        grids = [k for k, d in space.items() if d.kind == "grid_search"]
        if grids:
            raise reader.fail(f"'search.algorithm' optuna cannot grid_search ({', '.join(grids)}): use choice")
    points = spec.points_to_evaluate or []
    if len(points) > num_samples:
        raise reader.fail(f"'search.points_to_evaluate' lists {len(points)} points but num_samples is "
                          f"{num_samples}: each point is one of the samples")
    spec.points_to_evaluate = [
        {key: checker.value(key, value, f"search.points_to_evaluate[{i}]")
         for key, value in reader.known_keys(f"search.points_to_evaluate[{i}]", point, space).items()}
        for i, point in enumerate(points)]
    return spec


def _scheduler(reader: _Reader, values: Any, base: Config) -> SchedulerSpec:
    spec = reader.section(SchedulerSpec, "scheduler", values)
    if spec.type not in SCHEDULERS:
        raise reader.fail(f"'scheduler.type' must be one of {', '.join(SCHEDULERS)}, got {spec.type!r}")
    if spec.time_attr not in TIME_ATTRS:
        raise reader.fail(f"'scheduler.time_attr' must be epoch or step, got {spec.time_attr!r}")
    if spec.type == "fifo":
        return spec
    if spec.grace_period < 1 or not spec.reduction_factor > 1:
        raise reader.fail(f"'scheduler': grace_period must be >= 1 and reduction_factor > 1, got "
                          f"{spec.grace_period} and {spec.reduction_factor}")
    if not spec.max_t:
        length = run_length(base, spec.time_attr)
        if length is None:
            why = "train.max_steps is 0" if spec.time_attr == "step" else "train.max_steps is set"
            raise reader.fail(f"'scheduler.max_t': give it: the run's length in {spec.time_attr}s depends on the "
                              f"data ({why})")
        spec.max_t = length
    if spec.grace_period >= spec.max_t:
        raise reader.fail(f"'scheduler.grace_period' ({spec.grace_period}) must be below max_t ({spec.max_t}): "
                          "ASHA stops trials only before max_t")
    if spec.time_attr == "epoch" and base.train.eval_every_epochs == 0:
        raise reader.fail("'scheduler': ASHA compares trials on the metric at its rungs, but "
                          "train.eval_every_epochs=0 evaluates only at the end")
    if spec.time_attr == "epoch" and base.train.eval_every_epochs > spec.grace_period:
        raise reader.fail(f"'scheduler.grace_period' ({spec.grace_period} epochs) comes before the first "
                          f"evaluation (train.eval_every_epochs={base.train.eval_every_epochs})")
    return spec


def apply_resources(cfg: Config, resources: ResourcesSpec) -> Config:
    """The sweep's `resources` are the trials' ray.* keys."""
    ray = cfg.ray
    return dataclasses.replace(cfg, ray=dataclasses.replace(
        ray, num_workers=resources.workers_per_trial or ray.num_workers,
        cpus_per_worker=resources.cpus_per_worker or ray.cpus_per_worker,
        use_gpu=ray.use_gpu if resources.use_gpu is None else resources.use_gpu))


def tune_search_space(sweep: Sweep) -> dict:
    """{dotted key: Tune domain}. With the grid algorithm, choice lists are searched exhaustively."""
    from ray import tune

    def domain(d: Domain):
        kind = "grid_search" if sweep.search.algorithm == "grid" else d.kind
        if kind in ("grid_search", "choice"):
            return getattr(tune, kind)(list(d.args))
        return getattr(tune, kind)(*d.args)

    return {key: domain(d) for key, d in sweep.space.items()}


def plain(value: Any) -> Any:
    """A value as YAML and CSV write it (tuples as lists)."""
    return [plain(v) for v in value] if isinstance(value, tuple) else value


def copy_raw(sweep: Sweep) -> dict:
    return copy.deepcopy({**sweep.raw, "name": sweep.name})
