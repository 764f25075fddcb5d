"""The driver of `ddetr tune`: a Ray Tune sweep whose trials are `ddetr train` runs.

Ray Train V2 no longer runs inside `Tuner(TorchTrainer)`: each trial is a small function
(`run_trial`, holding no CPU) that builds the run's `TorchTrainer` with `build_torch_trainer`
and forwards the workers' reports to Tune (`TuneReportCallback`); the workers hold the
trial's resources, so the number of trials running at once is set from what the cluster
can place (Tune cannot see the workers' resources).

The sweep directory <output_dir>/<sweep name>/ (on_ray/sweep_dir.py names its files) holds
one run directory per trial, what the sweep started with, Tune's state (the same sweep
name resumes from it) and, at the end, the results (on_ray/sweep_results.py).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import yaml

from ddetr_dist.atomic import atomic_write_bytes
from ddetr_dist.config import Config, ConfigError, config_from_dict, load_config, save_config, to_dict, with_values
from ddetr_dist.engine.run_dir import RunDir
from ddetr_dist.storage import is_uri
from ddetr_dist.on_ray.driver import build_torch_trainer, check_before_start, check_model, connect_ray, \
    write_run_files
from ddetr_dist.on_ray.placement import check_resources, cluster_nodes, workers_that_fit
from ddetr_dist.on_ray.sweep_dir import SweepDir
from ddetr_dist.on_ray.sweep_file import Sweep, apply_resources, copy_raw, tune_search_space
from ddetr_dist.on_ray.sweep_results import SweepResult, sweep_result, trial_rows

log = logging.getLogger("ddetr_dist.tune")


def trial_name(trial) -> str:
    return SweepDir.trial_name(trial.trial_id)


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
    name = SweepDir.trial_name(tune.get_context().get_trial_id())
    cfg = trial_config(config_from_dict(base), params, name, sweep_dir)
    check_model(cfg)  # this trial's values (the sweep checked the base's): the trial fails, not its workers
    run_dir = RunDir.of(cfg)
    write_run_files(cfg, run_dir)
    build_torch_trainer(cfg, run_dir, use_gpu, callbacks=(TuneReportCallback(),)).fit()


def check_fixed_workers(cfg: Config) -> None:
    """A sweep's trials run at one world size each: a range (elastic, docs/elastic.md) would
    let trials train at different global batches and step counts, whose results a sweep
    cannot compare, and trials would take each other's workers."""
    if cfg.ray.is_elastic():
        raise ConfigError(f"config key 'ray.num_workers' = {cfg.ray.num_workers!r} is a range (elastic workers), which "
                          "`ddetr tune` does not take: its trials must train at one world size to be compared. Give "
                          "one number (ray.num_workers=2, or the sweep file's resources.workers_per_trial)")


def check_sweep_on_a_file_system(cfg: Config) -> None:
    """The sweep directory (its results table, the searcher's state, every trial's run) is
    written and read back by Tune and by us as files: a path, not object storage."""
    if is_uri(cfg.output_dir):
        raise ConfigError(f"config key 'output_dir' = {cfg.output_dir!r}: `ddetr tune` keeps its sweep on a file "
                          "system (a path every node mounts); object storage is for `ddetr train` runs "
                          "(docs/object-storage.md)")


def trials_that_fit(cfg: Config, use_gpu: bool) -> int:
    """How many trials the cluster can place at once (at least 1: check_resources has
    already failed when not even one fits)."""
    # per node (a worker's resources are on one node), and with the nodes an autoscaler may
    # add: a cap from the live nodes alone would hide the demand it scales up for
    fit = workers_that_fit(cluster_nodes(), cfg.ray.cpus_per_worker, 1 if use_gpu else 0)
    return max(1, fit // cfg.ray.worker_range()[1])  # one number (check_fixed_workers), maybe written '2-2'


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


def started_before(sweep_dir: SweepDir, sweep: Sweep, trial_base: Config) -> bool:
    """-> True when this sweep ran before and resumes. It must be the same sweep: Tune keeps
    the search space it started with, and finished trials ran the old config."""
    from ray.tune import Tuner

    if not Tuner.can_restore(str(sweep_dir)):
        return False
    if not sweep_dir.started_sweep.exists():
        raise ConfigError(f"{sweep_dir} holds a Tune experiment that `ddetr tune` did not start: give the sweep "
                          "another name (--name)")
    before = yaml.safe_load(sweep_dir.started_sweep.read_text())
    changed = differing_keys(before, copy_raw(sweep))
    changed += differing_keys({k: v for k, v in to_dict(load_config(sweep_dir.started_base)).items() if k != "name"},
                              {k: v for k, v in to_dict(trial_base).items() if k != "name"})
    if changed:
        raise ConfigError(f"sweep '{sweep.name}' in {sweep_dir} was started with other values of "
                          f"{', '.join(changed)}: run it with the same sweep file and config to resume it, or "
                          "give the new sweep another name (--name)")
    return True


def record_start(sweep_dir: SweepDir, sweep: Sweep, trial_base: Config) -> None:
    """What a restart must match (started_before)."""
    sweep_dir.path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(sweep_dir.started_sweep, yaml.safe_dump(copy_raw(sweep), sort_keys=False).encode())
    save_config(trial_base, sweep_dir.started_base)


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


def _tuner(sweep: Sweep, sweep_dir: SweepDir, trial_base: Config, use_gpu: bool, concurrent: int, resume: bool,
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
        run_config=tune.RunConfig(name=sweep.name, storage_path=str(sweep_dir.path.parent),
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[CSVLoggerCallback(), JsonLoggerCallback()]))


def run_sweep(base: Config, sweep: Sweep, retry_errored: bool = False) -> SweepResult:
    """Run (or resume) the sweep to its end; -> the table's rows and the best config.
    Raises ConfigError before any trial starts."""
    check_sweep_on_a_file_system(base)
    trial_base = check_before_start(apply_resources(base, sweep.resources))  # num_classes resolved
    check_fixed_workers(trial_base)
    sweep_dir = SweepDir.of(base, sweep.name)
    started_ray = connect_ray(trial_base)
    try:
        use_gpu = check_resources(trial_base)
        concurrent = sweep.resources.max_concurrent_trials or trials_that_fit(trial_base, use_gpu)
        resume = started_before(sweep_dir, sweep, trial_base)
        if not resume:
            record_start(sweep_dir, sweep, trial_base)
        log.info("%s sweep %s: %d sample(s), %d trial(s) at a time, %d worker(s) each", "resuming" if resume else
                 "starting", sweep_dir, sweep.num_samples, concurrent, trial_base.ray.worker_range()[1])
        grid = _tuner(sweep, sweep_dir, trial_base, use_gpu, concurrent, resume, retry_errored).fit()
        rows = trial_rows(grid, sweep)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return sweep_result(rows, sweep, sweep_dir, trial_base)
