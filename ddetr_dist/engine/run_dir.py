"""The run directory `<output_dir>/<name>/`: the one place in the code that spells its paths.

    config.yaml                      the resolved config (the driver writes it; `ddetr eval` reads it)
    deepspeed_config.json            the DeepSpeed JSON generated from it
    metrics.jsonl                    one JSON record per logged step, evaluation, checkpoint, ...
    tensorboard/                     TensorBoard events (rank 0)
    eval/<step:08d>/                 the train loop's evaluations: detections.json, metrics.json,
                                     predictions.png
    eval/manual-<time>/              `ddetr eval`'s
    checkpoint_<step:09d>_<run id>/  the checkpoints of a Ray run (Ray Train's storage is the run
                                     directory; the run id keeps names unique across restarts)
    checkpoints/step_<step:08d>/     the checkpoints of a run without Ray (tests, the benchmark)
    CHECKPOINT_NOW                   present: save a checkpoint at the next step (then deleted)
    model_final.pth                  the consolidated model, official parameter names
    final_metrics.json               the end's summary; present once the run finished

Ray adds its own files (its run snapshot, checkpoint_manager_snapshot.json). What is inside
a checkpoint folder is the checkpoint format's business (engine/train_state.py).

With `output_dir` a URI (object storage), the run directory is `<output_dir>/<name>` in the
store, and `path` is this node's working copy of it (storage.staging_dir): the files above
are written there and uploaded (engine/run_store.py); Ray uploads its checkpoints itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ddetr_dist.storage import is_uri, staging_dir

CONFIG = "config.yaml"
RAY_CHECKPOINT_PREFIX = "checkpoint_"
FOLDER_CHECKPOINT_PREFIX = "step_"


@dataclass(frozen=True)
class EvalDir:
    """The files of one evaluation (in a run directory, or `ddetr eval --out`)."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def detections(self) -> Path:  # COCO results
        return self.path / "detections.json"

    @property
    def metrics(self) -> Path:  # written last: its presence marks a finished evaluation
        return self.path / "metrics.json"

    @property
    def predictions(self) -> Path:  # the fixed val images drawn with their predictions
        return self.path / "predictions.png"


@dataclass(frozen=True)
class RunDir:
    """`RunDir(path)` or `RunDir.of(cfg)`; `os.fspath(run_dir)` is the folder itself (for a run
    in object storage: this node's working copy; `store_uri` is the run's URI)."""

    path: Path
    store_uri: str = ""  # "": the run directory is `path` itself (a local or shared file system)

    def __post_init__(self):
        if isinstance(self.path, RunDir) and not self.store_uri:
            object.__setattr__(self, "store_uri", self.path.store_uri)
        object.__setattr__(self, "path", Path(self.path))  # from a str, a Path or another RunDir

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def where(self) -> str:
        """What to tell a person: the run's URI, or its folder."""
        return self.store_uri or str(self.path)

    @classmethod
    def of(cls, cfg) -> "RunDir":
        """The run directory of a config: <output_dir>/<name>, absolute (a URI's: this
        node's working copy, and the URI)."""
        if is_uri(cfg.output_dir):
            return cls.at(f"{cfg.output_dir.rstrip('/')}/{cfg.name}")
        return cls(Path(cfg.output_dir).expanduser().resolve() / cfg.name)

    @classmethod
    def at(cls, where: str) -> "RunDir":
        """The run directory `where` names (a `where` of another node): a path, or a URI and
        this node's working copy of it."""
        return cls(staging_dir(where), store_uri=where) if is_uri(where) else cls(where)

    def uri_of(self, path: Path) -> str:
        """What to tell a person for a file of the run: its URI in the store, or its path."""
        return f"{self.store_uri}/{Path(path).relative_to(self.path).as_posix()}" if self.store_uri else str(path)

    @classmethod
    def above(cls, path: Path, levels: int = 3) -> "RunDir | None":
        """The run directory a file or checkpoint folder lies in (its config.yaml is at most
        `levels` folders up), or None."""
        for parent in list(Path(path).parents)[:levels]:
            if cls(parent).config.is_file():
                return cls(parent)
        return None

    # ------------------------------------------------------------------ files of the run

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def deepspeed_config(self) -> Path:
        return self.path / "deepspeed_config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def checkpoint_request(self) -> Path:
        return self.path / "CHECKPOINT_NOW"

    @property
    def final_model(self) -> Path:
        return self.path / "model_final.pth"

    @property
    def final_metrics(self) -> Path:
        return self.path / "final_metrics.json"

    # ------------------------------------------------------------------ evaluations

    @property
    def evaluations(self) -> Path:
        return self.path / "eval"

    def eval_at(self, step: int) -> EvalDir:
        """The train loop's evaluation at `step`."""
        return EvalDir(self.evaluations / f"{step:08d}")

    def manual_eval(self, stamp: str) -> EvalDir:
        """A `ddetr eval` of this run (not one of the loop's steps)."""
        return EvalDir(self.evaluations / f"manual-{stamp}")

    def step_evaluations(self) -> dict[int, EvalDir]:
        """The train loop's finished evaluations, by step (`ddetr eval`'s are not steps)."""
        return {int(path.parent.name): EvalDir(path.parent) for path in self.evaluations.glob("*/metrics.json")
                if path.parent.name.isdecimal()}

    # ------------------------------------------------------------------ checkpoint folders

    @staticmethod
    def ray_checkpoint_name(step: int, run_id: str) -> str:
        """The name Ray gives the checkpoint of `step` in the run directory."""
        return f"{RAY_CHECKPOINT_PREFIX}{step:09d}_{run_id}"

    @property
    def folder_checkpoints(self) -> Path:
        """Where a run without Ray keeps its checkpoints."""
        return self.path / "checkpoints"

    def folder_checkpoint(self, step: int) -> Path:
        return self.folder_checkpoints / f"{FOLDER_CHECKPOINT_PREFIX}{step:08d}"

    def folder_checkpoints_by_step(self) -> list[Path]:
        """checkpoints/step_*, oldest first (complete or not)."""
        return sorted(self.folder_checkpoints.glob(f"{FOLDER_CHECKPOINT_PREFIX}*"),
                      key=lambda d: int(d.name.removeprefix(FOLDER_CHECKPOINT_PREFIX)))

    def checkpoint_folders(self) -> list[Path]:
        """Every checkpoint folder of either form, in no order (complete or not)."""
        return [*self.path.glob(f"{RAY_CHECKPOINT_PREFIX}*"),
                *self.folder_checkpoints.glob(f"{FOLDER_CHECKPOINT_PREFIX}*")]
