"""The driver of `ddetr tune`: a Ray Tune sweep whose trials are `ddetr train` runs.

Ray Train V2 no longer runs inside `Tuner(TorchTrainer)`: each trial is a small function
(`run_trial`, holding no CPU) that builds the run's `TorchTrainer` with `build_torch_trainer`
and forwards the workers' reports to Tune (`TuneReportCallback`); the workers hold the
trial's resources, so the number of trials running at once is set from what the cluster
can place (Tune cannot see the workers' resources).

<output_dir>/<sweep name>/ holds the sweep:
  trial_<id>/          one run directory per trial, as `ddetr train` writes it (config.yaml,
                       metrics.jsonl, tensorboard/, checkpoints, model_final.pth), with Tune's
                       params.json, progress.csv and, for a failed trial, error.txt
  results.csv          one row per trial: the swept values, best metric, steps, status
  best_config.yaml     the best trial's config, for `ddetr train --config`
  sweep.yaml, base_config.yaml   what the sweep started with: a restart must match them
  tuner.pkl, experiment_state-*.json   Tune's state: the same sweep name resumes from it
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from ddetr_dist.atomic import atomic_write_bytes
from ddetr_dist.config import Config, ConfigError, config_from_dict, config_to_yaml, \
    load_config, save_config, to_dict
from ddetr_dist.on_ray.sweep_file import Sweep, apply_resources, copy_raw, plain, tune_search_space, with_values
from ddetr_dist.on_ray.driver import build_torch_trainer, check_before_start, check_model, check_resources, \
    cluster_nodes, connect_ray, run_dir_of, workers_that_fit, write_run_files

log = logging.getLogger("ddetr_dist.tune")
RESULTS_CSV = "results.csv"
BEST_CONFIG = "best_config.yaml"
STARTED_SWEEP = "sweep.yaml"
STARTED_BASE = "base_config.yaml"
DONE, STOPPED, ERROR, UNFINISHED = "done", "stopped early", "ERROR", "unfinished"


@dataclass
class TrialRow:
    name: str
    params: dict  # the swept keys' values
    best: Optional[float]  # the best reported value of the sweep's metric
    best_step: Optional[int]
    steps: int  # optimizer steps trained (metrics.jsonl)
    status: str  # DONE, STOPPED (by the scheduler), ERROR, or UNFINISHED (the sweep was interrupted)
    error: str  # the error's last line, for ERROR
    run_dir: Path


@dataclass
class SweepResult:
    sweep: Sweep
    sweep_dir: Path
    rows: list  # of TrialRow, best first
    best: Optional[TrialRow]
    best_config: Optional[Path]

    @property
    def failed(self) -> list:
        return [r for r in self.rows if r.status == ERROR]

    @property
    def unfinished(self) -> list:
        return [r for r in self.rows if r.status == UNFINISHED]


def sweep_dir_of(base: Config, sweep: Sweep) -> Path:
    return Path(base.output_dir).expanduser().resolve() / sweep.name


def trial_name(trial) -> str:
    """The trial's name, run name and directory: Tune's trial id (`<sweep run>_<index>`),
    which a resumed sweep keeps, so a resumed trial finds its run directory again."""
    return f"trial_{trial.trial_id}"


def trial_config(base: Config, params: dict, name: str, sweep_dir: str) -> Config:
    return dataclasses.replace(with_values(base, params), name=name, output_dir=sweep_dir)


def run_trial(params: dict, *, base: dict, sweep_dir: str, driver_cwd: str, use_gpu: bool) -> None:
    """One trial, in its Tune actor: the `ddetr train` run of base + params. Its run
    directory is <sweep dir>/<trial name>: run again (a resumed sweep), Ray Train finds the
    run's checkpoints there and the workers continue from the newest."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    # Tune starts trials in a folder of its own: relative paths (data shards) mean what they
    # meant where `ddetr tune` ran, as for `ddetr train` (the workers do the same)
    if Path(driver_cwd).is_dir():
        os.chdir(driver_cwd)
    name = f"trial_{tune.get_context().get_trial_id()}"
    cfg = trial_config(config_from_dict(base), params, name, sweep_dir)
    check_model(cfg)  # this trial's values (the sweep checked the base's): the trial fails, not its workers
    run_dir = run_dir_of(cfg)
    write_run_files(cfg, run_dir)
    build_torch_trainer(cfg, run_dir, use_gpu, callbacks=(TuneReportCallback(),)).fit()


def trials_that_fit(cfg: Config, use_gpu: bool) -> int:
    """How many trials the cluster can place at once (at least 1: check_resources has
    already failed when not even one fits)."""
    # per node (a worker's resources are on one node), and with the nodes an autoscaler may
    # add: a cap from the live nodes alone would hide the demand it scales up for
    fit = workers_that_fit(cluster_nodes(), cfg.ray.cpus_per_worker, 1 if use_gpu else 0)
    return max(1, fit // cfg.ray.num_workers)


def differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differing_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def started_before(sweep_dir: Path, sweep: Sweep, trial_base: Config) -> bool:
    """-> True when this sweep ran before and resumes. It must be the same sweep: Tune keeps
    the search space it started with, and finished trials ran the old config."""
    from ray.tune import Tuner

    if not Tuner.can_restore(str(sweep_dir)):
        return False
    if not (sweep_dir / STARTED_SWEEP).exists():
        raise ConfigError(f"{sweep_dir} holds a Tune experiment that `ddetr tune` did not start: give the sweep "
                          "another name (--name)")
    before = yaml.safe_load((sweep_dir / STARTED_SWEEP).read_text())
    changed = differing_keys(before, copy_raw(sweep))
    changed += differing_keys({k: v for k, v in to_dict(load_config(sweep_dir / STARTED_BASE)).items() if k != "name"},
                              {k: v for k, v in to_dict(trial_base).items() if k != "name"})
    if changed:
        raise ConfigError(f"sweep '{sweep.name}' in {sweep_dir} was started with other values of "
                          f"{', '.join(changed)}: run it with the same sweep file and config to resume it, or "
                          "give the new sweep another name (--name)")
    return True


def _search_algorithm(sweep: Sweep, concurrent: int):
    """With the trials' concurrency: Tune ignores TuneConfig.max_concurrent_trials when
    given a search algorithm object."""
    points = list(sweep.search.points_to_evaluate) or None
    if sweep.search.algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(points_to_evaluate=points, seed=sweep.search.seed), concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=points, random_state=sweep.search.seed, max_concurrent=concurrent)


def _scheduler(sweep: Sweep):
    s = sweep.scheduler
    if s.type == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Rungs strictly below max_t (Tune's include max_t itself): a trial judged at its very
    # last report would be stopped before it writes model_final.pth. stop_last_trials=False:
    # a trial that passes the rungs runs its own length.
    return ASHAScheduler(time_attr=s.time_attr, max_t=s.max_t - 1, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, stop_last_trials=False)


def _tuner(sweep: Sweep, sweep_dir: Path, trial_base: Config, use_gpu: bool, concurrent: int, resume: bool,
           retry_errored: bool):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    # The trial only waits on its Train controller; the workers hold the resources. Tune's
    # default of 1 CPU per trial would leave a 2-CPU machine one short for 2 workers, and
    # Tune refuses an empty request: 1 byte of memory is a request that takes nothing.
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(trial_base), sweep_dir=str(sweep_dir), driver_cwd=os.getcwd(),
                             use_gpu=use_gpu),
        {"cpu": 0, "memory": 1})
    # Tune's TensorBoard logger would add a second event file to each run directory (ours
    # is tensorboard/); read when the Tuner runs, started or restored
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    if resume:
        # Unfinished trials run again and continue from their own checkpoints; errored ones
        # only when asked (an error in a trial's config would just repeat). Tune's "resume"
        # keeps a trial's id, hence its run directory; its "restart" would start a new one.
        return tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=retry_errored)
    return tune.Tuner(
        trainable, param_space=tune_search_space(sweep),
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                                    search_alg=_search_algorithm(sweep, concurrent), scheduler=_scheduler(sweep),
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name,
                                    # a stopped trial's actor must end: its Train run (controller,
                                    # workers) dies with it rather than training on unseen
                                    reuse_actors=False),
        run_config=tune.RunConfig(name=sweep.name, storage_path=str(sweep_dir.parent),
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[CSVLoggerCallback(), JsonLoggerCallback()]))


def run_sweep(base: Config, sweep: Sweep, retry_errored: bool = False) -> SweepResult:
    """Run (or resume) the sweep to its end; -> the table's rows and the best config.
    Raises ConfigError before any trial starts."""
    trial_base = apply_resources(base, sweep.resources)
    check_before_start(trial_base)
    sweep_dir = sweep_dir_of(base, sweep)
    started_ray = connect_ray(trial_base)
    try:
        use_gpu = check_resources(trial_base)
        concurrent = sweep.resources.max_concurrent_trials or trials_that_fit(trial_base, use_gpu)
        resume = started_before(sweep_dir, sweep, trial_base)
        if not resume:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(sweep_dir / STARTED_SWEEP, yaml.safe_dump(copy_raw(sweep), sort_keys=False).encode())
            save_config(trial_base, sweep_dir / STARTED_BASE)
        log.info("%s sweep %s: %d sample(s), %d trial(s) at a time, %d worker(s) each", "resuming" if resume else
                 "starting", sweep_dir, sweep.num_samples, concurrent, trial_base.ray.num_workers)
        grid = _tuner(sweep, sweep_dir, trial_base, use_gpu, concurrent, resume, retry_errored).fit()
        rows = [_row(result, sweep) for result in grid]
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    rows.sort(key=lambda r: (r.best is None, (-1 if sweep.mode == "max" else 1) * (r.best or 0.0), r.name))
    best = rows[0] if rows and rows[0].best is not None else None
    write_results_csv(sweep_dir / RESULTS_CSV, rows, sweep)
    interrupted = any(r.status == UNFINISHED for r in rows)  # then the best so far is not the sweep's best
    best_config = write_best_config(trial_base, sweep, best, sweep_dir / BEST_CONFIG) if best and not interrupted \
        else None
    return SweepResult(sweep, sweep_dir, rows, best, best_config)


# ---------------------------------------------------------------- the results


def _best_reported(frame, metric: str, mode: str) -> tuple[Optional[float], Optional[int]]:
    """The best value of `metric` among a trial's reports (only evaluations carry it)."""
    if frame is None or metric not in frame.columns:
        return None, None
    evals = frame.dropna(subset=[metric])
    if evals.empty:
        return None, None
    at = evals[metric].idxmax() if mode == "max" else evals[metric].idxmin()
    return float(evals[metric][at]), int(evals["step"][at])


def _trained_steps(run_dir: Path) -> int:
    from ddetr_dist.engine.metrics import read_metrics

    steps = [r["step"] for r in read_metrics(run_dir) if r.get("event") == "train"]
    return max(steps, default=0)


def _last_line(error: Optional[BaseException]) -> str:
    """The root cause's line ("FileNotFoundError: ..."), not Ray's wrapping."""
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if "Error: " in line or "Exception: " in line]
    return (causes or lines or [type(error).__name__])[-1][:300]


def _row(result, sweep: Sweep) -> TrialRow:
    from ddetr_dist.engine.loop import FINAL_METRICS

    run_dir = Path(result.path)
    # the trial's values as Tune's JSON logger wrote them at its start (result.config comes
    # from the last report, which a trial that failed before reporting lacks)
    params_file = run_dir / "params.json"
    params = json.loads(params_file.read_text()) if params_file.exists() else result.config or {}
    best, best_step = _best_reported(result.metrics_dataframe, sweep.metric, sweep.mode)
    # Tune marks the last result `done` when the trial ended or the scheduler stopped it;
    # only a completed run has written final_metrics.json. Neither: a Ctrl-C interrupted it.
    status = ERROR if result.error else DONE if (run_dir / FINAL_METRICS).exists() else \
        STOPPED if (result.metrics or {}).get("done") else UNFINISHED
    return TrialRow(run_dir.name, {k: params.get(k) for k in sweep.space}, best, best_step,
                    _trained_steps(run_dir), status, _last_line(result.error), run_dir)


def _columns(sweep: Sweep) -> list[str]:
    return ["trial", *sweep.space, f"best_{sweep.metric}", "best_step", "steps", "status", "error", "run_dir"]


def _cells(row: TrialRow, sweep: Sweep) -> list:
    return [row.name, *(plain(row.params.get(k)) for k in sweep.space), row.best, row.best_step, row.steps,
            row.status, row.error, str(row.run_dir)]


def write_results_csv(path: Path, rows: list, sweep: Sweep) -> None:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(_columns(sweep))
    writer.writerows(["" if v is None else v for v in _cells(row, sweep)] for row in rows)
    atomic_write_bytes(path, out.getvalue().encode())


def _shown(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return repr(value) if value == "" else str(value)


def results_table(result: SweepResult) -> str:
    """The rows as aligned text (best first), without the CSV's run_dir and full errors."""
    sweep = result.sweep
    head = _columns(sweep)[:-2]
    body = [[_shown(v) for v in _cells(row, sweep)[:-2]] for row in result.rows]
    for line, row in zip(body, result.rows):
        if row.status == ERROR:
            line[-1] = f"{ERROR}: {row.error[:80]}"
    widths = [max(len(x) for x in column) for column in zip(head, *body)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [head, *body])


def write_best_config(trial_base: Config, sweep: Sweep, best: TrialRow, path: Path) -> Path:
    """The best trial's config (base + overrides + its values) under a name of its own, so
    that `ddetr train --config` starts a fresh run rather than resuming a trial."""
    cfg = dataclasses.replace(with_values(trial_base, best.params), name=f"{sweep.name}-best")
    values = ", ".join(f"{k}={plain(v)!r}" for k, v in best.params.items())
    header = (f"# The best trial of sweep '{sweep.name}': {best.name}, {sweep.metric} {best.best:.4g} at step "
              f"{best.best_step} ({best.run_dir}).\n# Its values: {values}\n"
              f"# Train it: ddetr train --config {path}\n")
    atomic_write_bytes(path, (header + config_to_yaml(cfg)).encode())
    return path
