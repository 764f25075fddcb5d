"""Sweep hyperparameters: a Ray Tune search whose trials are `ddetr train` runs.

  ddetr tune --config FILE --sweep SWEEP.yaml [--name NAME] [--retry-errored] [section.key=value ...]
  python -m ddetr_dist.tune --config FILE --sweep SWEEP.yaml [section.key=value ...]

Each trial trains the config (FILE, then the overrides) with the values Tune picked for it,
as `ddetr train` would, in its own run directory <output_dir>/<sweep name>/trial_<id>/
(config.yaml, metrics.jsonl, tensorboard/, checkpoints, model_final.pth). At the end the
table of trials (swept values, best metric, steps, status) is printed and written to
<output_dir>/<sweep name>/results.csv, and the best trial's config to best_config.yaml there
(`ddetr train --config` takes it). Run the same command again after the driver died and the
sweep resumes: finished trials stay, interrupted ones continue from their own checkpoints.
Exit code 1 when a trial failed (the table is still written), 2 for a bad config or sweep file,
130 when interrupted (Ctrl-C: the same command resumes).

the sweep file (YAML; examples in configs/sweeps/):
  name         the sweep's folder under output_dir (default: the file's name; --name overrides)
  metric       AP, AP50, AP75, APs, APm, APl, AR100 or val_loss: what the evaluations
               (data.val_shards, every train.eval_every_epochs) report (default AP)
  mode         max or min (default: min for val_loss, else max)
  num_samples  trials drawn (each grid_search combination runs num_samples times)
  space        dotted config key -> one domain:
                 {grid_search: [a, b]}  every value        {choice: [a, b]}   one drawn per trial
                 {uniform: [lo, hi]}    {quniform: [lo, hi, q]}
                 {loguniform: [lo, hi]} {qloguniform: [lo, hi, q]}   {randint: [lo, hi)}
  search       algorithm: random (default) | grid (every choice value too) | optuna (needs the
               optuna package); seed: for reproducible draws; points_to_evaluate: a list of
               {key: value} run first, in order (each one of the num_samples)
  scheduler    type: fifo (default: every trial runs to its end) | asha (early stopping on
               the metric); time_attr: epoch (default) | step; grace_period (default 1),
               reduction_factor (default 2), max_t (default: the run's length): ASHA compares
               trials at grace_period x reduction_factor^k below max_t and stops the worse ones
  resources    workers_per_trial (ray.num_workers), cpus_per_worker (ray.cpus_per_worker),
               use_gpu (ray.use_gpu), max_concurrent_trials (default: as many as the cluster
               can place at once)

  name: lr_points
  metric: AP
  num_samples: 8
  space:
    optim.lr: {loguniform: [5.0e-5, 1.0e-3]}
    model.dec_n_points: {choice: [2, 4]}
    loss.giou_loss_coef: {uniform: [1.0, 3.0]}
  search: {algorithm: random, seed: 0, points_to_evaluate: [{optim.lr: 2.0e-4}]}
  scheduler: {type: asha, time_attr: epoch, grace_period: 2, reduction_factor: 2}
  resources: {workers_per_trial: 2, cpus_per_worker: 1}

examples:
  ddetr tune --sweep configs/sweeps/demo.yaml                    # the demo config, trials one after another here
  ddetr tune --config configs/base.yaml --sweep configs/sweeps/lr_queries.yaml ray.address=head:6379
  ddetr tune --config configs/demo.yaml --sweep configs/sweeps/demo.yaml optim.epochs=4 --name demo_short
  ddetr tune --sweep configs/sweeps/demo.yaml --retry-errored      # resume, and run failed trials again
"""
from __future__ import annotations

import argparse
import logging
import sys

from ddetr_dist.config import DEMO_CONFIG, REPO, ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help=f"YAML config of every trial (default: the demo, {DEMO_CONFIG.relative_to(REPO)})")
    parser.add_argument("--sweep", required=True, help="the sweep file (see above; examples in configs/sweeps/)")
    parser.add_argument("--name", default=None, help="the sweep's name (default: the sweep file's `name`)")
    parser.add_argument("--retry-errored", action="store_true",
                        help="resuming: run failed trials again (from their newest checkpoint)")
    parser.add_argument("overrides", nargs="*", default=[], help="section.key=value config overrides")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ddetr_dist.on_ray.sweep_file import load_sweep
    from ddetr_dist.on_ray.sweep_results import results_table
    from ddetr_dist.on_ray.tune import run_sweep

    try:
        cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
        sweep = load_sweep(args.sweep, cfg, name=args.name)
        if args.config is None:
            from ddetr_dist.data.demo import ensure_demo_data

            ensure_demo_data(cfg.data.train_shards)
        result = run_sweep(cfg, sweep, retry_errored=args.retry_errored)
    except ConfigError as e:
        print(f"ddetr tune: {e}", file=sys.stderr)
        return 2
    print(f"\nsweep {sweep.name}: {len(result.rows)} trial(s), {sweep.metric} ({sweep.mode})")
    print(results_table(result))
    print(f"  table: {result.results_csv}")
    if result.unfinished:
        print(f"ddetr tune: interrupted before {len(result.unfinished)} trial(s) finished; run the same command to "
              "resume the sweep", file=sys.stderr)
        return 130
    if result.best is not None:
        print(f"  best: {result.best.name} ({sweep.metric} {result.best.best:.4g}); its config: {result.best_config}\n"
              f"  train it: ddetr train --config {result.best_config}")
    if result.failed:
        names = ", ".join(f"{r.name} ({r.error or 'see error.txt'})" for r in result.failed)
        print(f"ddetr tune: {len(result.failed)} of {len(result.rows)} trial(s) failed: {names}; their tracebacks: "
              f"<trial dir>/error.txt", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddetr_dist.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
