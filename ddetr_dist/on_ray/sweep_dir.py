"""The sweep directory `<output_dir>/<sweep name>/` of `ddetr tune`: the one place in the
code that spells its paths.

    trial_<id>/                        one run directory per trial, as `ddetr train` writes it
                                       (engine/run_dir.py), with Tune's params.json,
                                       progress.csv and, for a failed trial, error.txt
    results.csv                        one row per trial: the swept values, best metric, steps, status
    best_config.yaml                   the best trial's config, for `ddetr train --config`
    sweep.yaml, base_config.yaml       what the sweep started with: a restart must match them
    tuner.pkl, experiment_state-*.json Tune's state: the same sweep name resumes from it
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TRIAL_PREFIX = "trial_"
TUNE_PARAMS = "params.json"  # a trial's values, as Tune's JSON logger writes them


@dataclass(frozen=True)
class SweepDir:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def of(cls, base, sweep_name: str) -> "SweepDir":
        """<output_dir of the base config>/<sweep name>, absolute."""
        return cls(Path(base.output_dir).expanduser().resolve() / sweep_name)

    @staticmethod
    def trial_name(trial_id: str) -> str:
        """A trial's name, run name and folder: Tune's trial id (`<sweep run>_<index>`), which
        a resumed sweep keeps, so that a resumed trial finds its run directory again."""
        return f"{TRIAL_PREFIX}{trial_id}"

    @property
    def results_csv(self) -> Path:
        return self.path / "results.csv"

    @property
    def best_config(self) -> Path:
        return self.path / "best_config.yaml"

    @property
    def started_sweep(self) -> Path:
        return self.path / "sweep.yaml"

    @property
    def started_base(self) -> Path:
        return self.path / "base_config.yaml"

    @staticmethod
    def tune_params(trial_dir: Path) -> Path:
        return Path(trial_dir) / TUNE_PARAMS
