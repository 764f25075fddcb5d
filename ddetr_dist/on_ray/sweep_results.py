"""The results of a `ddetr tune` sweep: one row per trial (its swept values, the best value
of the sweep's metric it reported, its steps and how it ended), best first; the table as
results.csv and as text, and the best trial's config as a file `ddetr train` takes."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ddetr_dist.atomic import atomic_write_bytes
from ddetr_dist.config import Config, config_to_yaml, with_values
from ddetr_dist.engine.run_dir import RunDir
from ddetr_dist.on_ray.sweep_dir import SweepDir
from ddetr_dist.on_ray.sweep_file import Sweep, plain

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

    @property
    def results_csv(self) -> Path:
        return SweepDir(self.sweep_dir).results_csv


def trial_rows(grid, sweep: Sweep) -> list[TrialRow]:
    """One row per trial of Tune's `ResultGrid`."""
    return [_row(result, sweep) for result in grid]


def sweep_result(rows: list[TrialRow], sweep: Sweep, sweep_dir: SweepDir, trial_base: Config) -> SweepResult:
    """The rows best first; writes results.csv and, unless the sweep was interrupted (then
    the best so far is not the sweep's best), best_config.yaml."""
    rows.sort(key=lambda r: (r.best is None, (-1 if sweep.mode == "max" else 1) * (r.best or 0.0), r.name))
    best = rows[0] if rows and rows[0].best is not None else None
    write_results_csv(sweep_dir.results_csv, rows, sweep)
    interrupted = any(r.status == UNFINISHED for r in rows)
    best_config = write_best_config(trial_base, sweep, best, sweep_dir.best_config) if best and not interrupted \
        else None
    return SweepResult(sweep, sweep_dir.path, rows, best, best_config)


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
    run_dir = Path(result.path)
    # the trial's values as Tune's JSON logger wrote them at its start (result.config comes
    # from the last report, which a trial that failed before reporting lacks)
    params_file = SweepDir.tune_params(run_dir)
    params = json.loads(params_file.read_text()) if params_file.exists() else result.config or {}
    best, best_step = _best_reported(result.metrics_dataframe, sweep.metric, sweep.mode)
    # Tune marks the last result `done` when the trial ended or the scheduler stopped it;
    # only a completed run has written final_metrics.json. Neither: a Ctrl-C interrupted it.
    status = ERROR if result.error else DONE if RunDir(run_dir).final_metrics.exists() else \
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
