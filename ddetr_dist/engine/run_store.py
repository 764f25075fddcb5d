"""A run directory in object storage (`output_dir` a URI): what a node takes from the store
before it writes, and when what it wrote goes up.

Each node works in its own copy of the run directory (`RunDir.path`, node-local); the
store holds the run. Rank 0 pulls `metrics.jsonl` before a resume rewrites it, and pushes
what changed (metrics, TensorBoard events, evaluations, the final model) after every
checkpoint, at most every `PUSH_EVERY_S` with the log lines, and at the end. Ray uploads
the checkpoint folders itself (the store is its storage_path). An object appears whole or
not at all; files whose presence marks a finished write (an evaluation's metrics.json,
final_metrics.json) go up after the rest.

For a run on a local or shared file system (`store_uri` empty) every method does nothing:
the working copy is the run directory.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ddetr_dist.engine.portable import PORTABLE
from ddetr_dist.engine.run_dir import CONFIG, FOLDER_CHECKPOINT_PREFIX, RAY_CHECKPOINT_PREFIX, RunDir
from ddetr_dist.engine.train_state import META
from ddetr_dist.storage import Store, staging_dir

PUSH_EVERY_S = 60.0  # with the log lines: metrics and TensorBoard in the store at most a minute behind
MARKERS = ("metrics.json", "final_metrics.json")  # their presence says the files beside them are complete


class RunStore:
    """`RunStore(run_dir)`: pull before writing, push after."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = RunDir(run_dir)
        self.store = Store(self.run_dir.store_uri) if self.run_dir.store_uri else None
        self._pushed: dict[str, tuple[int, int]] | None = None  # relative name -> (size, mtime) pushed
        self._last_push = 0.0

    @classmethod
    def opened_by_rank_0(cls, run_dir: RunDir) -> "RunStore":
        """The run directory made ready for rank 0's writes: made, or (in object storage)
        this node's working copy started afresh with the store's metrics.jsonl, which a
        resume continues."""
        run_store = cls(run_dir)
        run_dir.path.mkdir(parents=True, exist_ok=True)
        run_store.start_empty()
        run_store.pull(run_store.run_dir.metrics)
        return run_store

    def _relative(self, path: Path) -> str:
        return Path(path).relative_to(self.run_dir.path).as_posix()

    def has(self, path: Path) -> bool:
        """Whether the run has this file (in the store, or in the run directory)."""
        return self.store.is_file(self._relative(path)) if self.store else Path(path).is_file()

    def newest_checkpoint(self) -> str | None:
        """The relative name of the run's newest complete checkpoint folder, or None."""
        if self.store is None:
            newest = newest_checkpoint(self.run_dir.path)
            return self._relative(newest) if newest is not None else None
        return _newest_checkpoint(self.store, self.store.entries())

    def start_empty(self) -> None:
        """Clear this node's working copy: what an earlier attempt or an earlier run of this
        name left on this node is not the run (the store is), and would be pushed as if it were."""
        if self.store is not None:
            shutil.rmtree(self.run_dir.path, ignore_errors=True)
            self.run_dir.path.mkdir(parents=True)
            self._pushed = None

    def pull(self, *paths: Path) -> None:
        """The store's copy of these files into the working copy; a file the store lacks is
        removed here too (a copy left on this node by an earlier attempt is not the run's)."""
        if self.store is None:
            return
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        for path in paths:
            if not self.store.download(self._relative(path), Path(path)):
                Path(path).unlink(missing_ok=True)

    def pull_tree(self, folder: Path) -> None:
        """Every file of the store below `folder` of the run into the working copy."""
        if self.store is not None:
            self.store.download_tree(self._relative(folder), Path(folder))

    def push(self, every_s: float = 0.0) -> None:
        """Upload the files of the working copy that changed since the last push (not
        checkpoint folders: Ray uploads those). `every_s`: skip if the last push is younger."""
        if self.store is None or time.monotonic() - self._last_push < every_s:
            return
        if self._pushed is None:  # what the store already has (same size) is not sent again
            self._pushed = {name: (size, -1) for name, size in self.store.files().items()}
        changed = []
        for path in self._files():
            name, stat = self._relative(path), path.stat()
            known = self._pushed.get(name)
            if known is None or known[0] != stat.st_size or known[1] not in (-1, stat.st_mtime_ns):
                changed.append((path, name, (stat.st_size, stat.st_mtime_ns)))
        for path, name, state in sorted(changed, key=lambda c: c[0].name in MARKERS):
            self.store.upload(path, name)
            self._pushed[name] = state
        self._last_push = time.monotonic()

    def _files(self) -> list[Path]:
        skip = (RAY_CHECKPOINT_PREFIX, self.run_dir.folder_checkpoints.name)
        files = []
        for top in self.run_dir.path.iterdir() if self.run_dir.path.is_dir() else ():
            if top.name.startswith(skip) or top.name.startswith("."):
                continue
            files += [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()]
        # not the temporary files of a write in progress (atomic.py's .tmp, Store.download's)
        return [f for f in files if not f.name.startswith(".") and f.suffix != ".tmp"]



def local_copy(uri: str) -> Path:
    """What `ddetr eval`/`predict`/`export` or fine-tuning point at in object storage (a run
    directory, one checkpoint folder, or a .pth), fetched into this node's working copy:
    -> the local path that stands for `uri`. Only what loading a model reads: the run's
    config.yaml, and the newest complete checkpoint's meta.json and weights (else
    model_final.pth), or the file itself. Files already here at the store's size are kept."""
    store, local = Store(uri), staging_dir(uri)
    if store.is_file(""):  # a .pth; the config of the run it lies in, if it does
        _fetch(store, "", local)
        for up in (1, 2):
            above = uri.rsplit("/", up)[0]
            if Store(above).is_file(CONFIG):
                _fetch(Store(above), CONFIG, staging_dir(above) / CONFIG)
                break
        return local
    if not store.is_dir(""):
        raise FileNotFoundError(f"checkpoint not found: {uri}")
    names = store.entries("")
    if PORTABLE in names:  # one checkpoint folder, and its run's config
        for name in (META, PORTABLE):
            _fetch(store, name, local / name)
        parent = uri.rsplit("/", 1)[0]
        if Store(parent).is_file(CONFIG):
            _fetch(Store(parent), CONFIG, staging_dir(parent) / CONFIG)
        return local
    run = RunDir(local, store_uri=uri)
    if CONFIG in names:
        _fetch(store, CONFIG, run.config)
    newest = _newest_checkpoint(store, names)
    for old in run.checkpoint_folders():  # left by an earlier fetch: only the store's newest counts here
        if newest is None or old != local / newest:
            shutil.rmtree(old, ignore_errors=True)
    if newest is not None:
        for name in (META, PORTABLE):
            _fetch(store, f"{newest}/{name}", local / newest / name)
    elif run.final_model.name in names:
        _fetch(store, run.final_model.name, run.final_model)
    return local


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run directory (Ray's or the folder form)."""
    found = [d for d in RunDir(run_dir).checkpoint_folders() if (d / META).is_file() and (d / PORTABLE).is_file()]
    return max(found, key=lambda d: json.loads((d / META).read_text())["step"], default=None)


def _newest_checkpoint(store: Store, names: list[str]) -> str | None:
    """The relative name of the run's newest checkpoint with its meta.json and weights."""
    folders = [n for n in names if n.startswith(RAY_CHECKPOINT_PREFIX)]
    if "checkpoints" in names:
        folders += [f"checkpoints/{n}" for n in store.entries("checkpoints") if n.startswith(FOLDER_CHECKPOINT_PREFIX)]
    steps = {}
    for folder in folders:
        if store.is_file(f"{folder}/{PORTABLE}") and store.is_file(f"{folder}/{META}"):
            steps[folder] = json.loads(store.read_bytes(f"{folder}/{META}"))["step"]
    return max(steps, key=steps.get, default=None)


def _fetch(store: Store, relative: str, local: Path) -> None:
    if not (local.is_file() and local.stat().st_size == store.size(relative)):
        store.download(relative, local)
