"""The sweep file of `ddetr tune` (its keys: `ddetr tune --help`; examples: configs/sweeps/),
read and checked before Ray starts: the config tree's typed reader (`config.read_into`) reads
it into `Sweep`, then every value a trial can get (each grid_search/choice value, range bound
and point_to_evaluate) goes through the config's own checks against the base config. Each
error names the file and the key.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from ddetr_dist.config import (Config, ConfigError, check_keys, check_training_config, did_you_mean, dotted_keys,
                               get_dotted, read_into, read_value, with_values)

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
    algorithm: Literal["random", "grid", "optuna"] = "random"  # random, grid: Tune's BasicVariantGenerator
    seed: Optional[int] = None  # for reproducible draws
    points_to_evaluate: list[dict] = field(default_factory=list)  # [{dotted key: value}], run first, in order


@dataclass
class SchedulerSpec:
    type: Literal["fifo", "asha"] = "fifo"  # fifo: every trial runs to its end; asha: early stopping
    time_attr: Literal["epoch", "step"] = "epoch"  # epochs completed, or optimizer steps (reported with checkpoints)
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
    """The file's keys; after `load_sweep`, every one set and checked."""

    name: Optional[str] = None  # the sweep's folder under output_dir; None = the file's name
    metric: str = "AP"
    mode: Optional[Literal["min", "max"]] = None  # None = min for val_loss, else max
    num_samples: int = 1
    space: dict = field(default_factory=dict)  # dotted config key -> Domain (in the file: {domain: args})
    search: SearchSpec = field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    raw: dict = field(default_factory=dict, init=False)  # the file as read (not a key): a resume must match it


def load_sweep(path: str | Path, base: Config, name: str | None = None) -> Sweep:
    """Read and check the sweep file against the base config (defaults, file, overrides)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path} (see configs/sweeps/)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        sweep = read_into(Sweep(), raw, label="key")
        sweep.name = name or sweep.name or path.stem
        _check(sweep, base)
    except (ConfigError, yaml.YAMLError) as e:
        raise ConfigError(f"sweep file {path}: {e}") from None
    sweep.raw = raw
    return sweep


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check(sweep: Sweep, base: Config) -> None:
    _need("/" not in sweep.name and sweep.name not in (".", ".."),
          f"'name' must be a plain directory name, got {sweep.name!r}")
    _need(bool(sweep.space), "'space' must map dotted config keys to domains, e.g. optim.lr: {loguniform: "
          "[1.0e-5, 1.0e-3]}")
    trials = _TrialValues(base)
    sweep.space = {str(key): trials.domain(str(key), spec) for key, spec in sweep.space.items()}
    _need(sweep.metric in EVAL_METRICS, f"'metric' {sweep.metric!r} is not reported by the workers."
          f"{did_you_mean(sweep.metric, EVAL_METRICS)} Choose one of {', '.join(EVAL_METRICS)}")
    _need(bool(base.data.val_shards), f"'metric' {sweep.metric} comes from evaluating data.val_shards, which the "
          "config leaves empty: set data.val_shards")
    sweep.mode = sweep.mode or ("min" if "loss" in sweep.metric else "max")
    _need(sweep.num_samples >= 1, f"'num_samples' must be >= 1, got {sweep.num_samples}")
    _check_search(sweep, trials)
    _check_scheduler(sweep.scheduler, base)
    res = sweep.resources
    for key in ("workers_per_trial", "cpus_per_worker"):
        _need(getattr(res, key) is None or getattr(res, key) >= 1,
              f"'resources.{key}' must be >= 1, got {getattr(res, key)}")
    _need(res.max_concurrent_trials >= 0, "'resources.max_concurrent_trials' must be >= 0 (0 = what the cluster "
          f"holds), got {res.max_concurrent_trials}")


class _TrialValues:
    """The search space's keys, and each value a trial can get tried in the base config:
    the config's own type checks, then the training checks (optim.lr > 0, ...)."""

    def __init__(self, base: Config):
        self.base, self.keys = base, dotted_keys(base)

    def key(self, key: str) -> None:
        """A leaf key of the config tree that trials may differ in; else the nearest one."""
        _need(key not in SET_BY_THE_SWEEP, f"space: '{key}' is set by the sweep for each trial (the trial's name, "
              "<output_dir>/<sweep name>): it cannot be searched")
        _need(key not in PER_SWEEP, f"space: '{key}' is the same for every trial (the sweep places trials by "
              f"it): set it with {PER_SWEEP.get(key)}")
        section = key.rpartition(".")[0]
        here = [k.rpartition(".")[2] for k in self.keys if section and k.rpartition(".")[0] == section]
        listing = f" Keys of '{section}': {', '.join(sorted(here))}" if here else ""
        _need(key in self.keys, f"space: '{key}' is not a config key.{did_you_mean(key, self.keys)}{listing}")

    def value(self, key: str, value: Any, where: str) -> Any:
        """-> the value as the config types it ('1e-4' -> 1e-4, lists -> tuples)."""
        try:
            cfg = with_values(self.base, {key: value})
            check_training_config(cfg)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        return get_dotted(cfg, key)

    def domain(self, key: str, spec: Any) -> Domain:
        where = f"space key '{key}'"
        self.key(key)
        _need(isinstance(spec, dict) and len(spec) == 1, f"{where}: give one domain, e.g. {{choice: [2, 4]}} or "
              f"{{loguniform: [1.0e-5, 1.0e-3]}}; domains: {', '.join(DOMAINS)}. Fixed values are overrides on "
              "the command line (section.key=value)")
        ((kind, args),) = spec.items()
        _need(kind in DOMAINS, f"{where}: unknown domain '{kind}'.{did_you_mean(kind, DOMAINS)} "
              f"Domains: {', '.join(DOMAINS)}")
        _need(isinstance(args, list) and bool(args), f"{where}: {kind} takes a list: {DOMAINS[kind]}")
        if kind in ("grid_search", "choice"):
            return Domain(kind, tuple(self.value(key, v, f"{where} ({kind} value {v!r})") for v in args))
        _need(len(args) == (3 if kind.startswith("q") else 2), f"{where}: {kind} takes {DOMAINS[kind]}, got {args!r}")
        number = int if kind == "randint" else float
        bounds = tuple(read_value(v, number, f"space.{key}.{kind}[{i}]", "key") for i, v in enumerate(args))
        low, high = bounds[:2]
        _need(low < high, f"{where}: {kind} needs low < high, got {args!r}")
        _need("loguniform" not in kind or low > 0, f"{where}: {kind} needs low > 0, got {low}")
        for bound in (low, high - 1 if kind == "randint" else high):  # randint's high is excluded
            self.value(key, bound, f"{where} ({kind} bound {bound!r})")
        return Domain(kind, bounds)


def _check_search(sweep: Sweep, trials: _TrialValues) -> None:
    spec, space = sweep.search, sweep.space
    ranges = [k for k, d in space.items() if d.kind not in ("grid_search", "choice")]
    _need(spec.algorithm != "grid" or not ranges, f"'search.algorithm' grid tries every value: {', '.join(ranges)} "
          "must be grid_search or choice lists, not ranges")
    if spec.algorithm == "optuna":
        _need(importlib.util.find_spec("optuna") is not None, "'search.algorithm' optuna needs the optuna package "
              "(pip install -c constraints.txt optuna), or use random")
        grids = [k for k, d in space.items() if d.kind == "grid_search"]
        _need(not grids, f"'search.algorithm' optuna cannot grid_search ({', '.join(grids)}): use choice")
    points = spec.points_to_evaluate
    _need(len(points) <= sweep.num_samples, f"'search.points_to_evaluate' lists {len(points)} points but "
          f"num_samples is {sweep.num_samples}: each point is one of the samples")
    spec.points_to_evaluate = [
        {key: trials.value(key, value, where) for key, value in check_keys(point, space, where, "key").items()}
        for where, point in ((f"search.points_to_evaluate[{i}]", p) for i, p in enumerate(points))]


def _check_scheduler(spec: SchedulerSpec, base: Config) -> None:
    if spec.type == "fifo":
        return
    _need(spec.grace_period >= 1 and spec.reduction_factor > 1, "'scheduler': grace_period must be >= 1 and "
          f"reduction_factor > 1, got {spec.grace_period} and {spec.reduction_factor}")
    if not spec.max_t:
        why = "train.max_steps is 0" if spec.time_attr == "step" else "train.max_steps is set"
        spec.max_t = run_length(base, spec.time_attr)
        _need(spec.max_t is not None, f"'scheduler.max_t': give it: the run's length in {spec.time_attr}s depends "
              f"on the data ({why})")
    _need(spec.grace_period < spec.max_t, f"'scheduler.grace_period' ({spec.grace_period}) must be below max_t "
          f"({spec.max_t}): ASHA stops trials only before max_t")
    if spec.time_attr == "epoch":
        every = base.train.eval_every_epochs
        _need(every != 0, "'scheduler': ASHA compares trials on the metric at its rungs, but "
              "train.eval_every_epochs=0 evaluates only at the end")
        _need(every <= spec.grace_period, f"'scheduler.grace_period' ({spec.grace_period} epochs) comes before the "
              f"first evaluation (train.eval_every_epochs={every})")


def run_length(cfg: Config, time_attr: str) -> Optional[int]:
    """The run's length in `time_attr` units, where the config alone says it."""
    if time_attr == "step":
        return cfg.train.max_steps or None
    return None if cfg.train.max_steps else cfg.optim.epochs


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
        return getattr(tune, kind)(list(d.args)) if kind in ("grid_search", "choice") else getattr(tune, kind)(*d.args)

    return {key: domain(d) for key, d in sweep.space.items()}


def plain(value: Any) -> Any:
    """A value as YAML and CSV write it (tuples as lists)."""
    return [plain(v) for v in value] if isinstance(value, tuple) else value


def copy_raw(sweep: Sweep) -> dict:
    return copy.deepcopy({**sweep.raw, "name": sweep.name})
