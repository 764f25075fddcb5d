"""Training checkpoints: what one holds, how each rank writes its part, how a run resumes.

A checkpoint is one directory (Ray merges every worker's files into it):

    meta.json                   step, epoch, position in the epoch, world size, ZeRO stage, counters
    portable.pt                 world-size-free: fp32 model + AdamW state by parameter name
                                (engine/portable.py), gathered to rank 0
    rank_state/rank_<r>.pt      each rank's RNG states (torch, python, numpy)

One copy of the weights and moments, in one format: DeepSpeed's own files (per-rank ZeRO
partitions) are not written. They would hold everything again (ZeRO-1/2 twice over: the
module and the fp32 partitions), and being keyed by rank they could not serve a resize.
Every resume loads `portable.pt` and re-cuts it for the engine it builds (engine/portable.py).
Parameters and AdamW state stay fp32 under every precision (deepspeed_config.py: autocast),
so nothing is lost: with the same world size, ZeRO stage and sample order, the loaded state
plus every rank's RNG is bitwise the run that was interrupted.

Every file of ours is written atomically; meta.json, written last, lists every file of
every rank with its size, so a directory missing a part (a rank's RNG state included) is
refused by name rather than half-loaded.

A save has two halves. `snapshot` (collective, the loop waits for it) writes each rank's
RNG state and copies its part of the portable state to the CPU; what it returns assembles
that on rank 0 (under ZeRO-1/2 one collective on a CPU group of its own, never the loop's)
and writes portable.pt and then meta.json, so the loop may run it in a background thread
(engine/checkpoint_writer.py) and train on. The other ranks' files are final before the
snapshot returns, so meta.json's list is whole when it is written.

"Exact" also needs the same sample order: meta.json records what decides it
(`data_order`); a resume where any of it changed continues at the same fraction of the
epoch and names the keys (engine/resume.py decides which). Checkpoints written before
this format also hold a `deepspeed/` folder; it is listed in their meta.json and ignored.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ddetr_dist.atomic import atomic_open, atomic_write_bytes
from ddetr_dist import comm
from ddetr_dist.engine.portable import PORTABLE, PortableSnapshot, snapshot_portable

META = "meta.json"


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint directory lacks a file its meta.json promises."""


@dataclass
class Progress:
    """Where a run is; saved in meta.json. `step` counts optimizer steps taken or skipped
    (a skipped step still consumes its batches), `batches_in_epoch` the batches of this
    rank's loader consumed in `epoch`."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    skipped_steps: int = 0  # non-finite loss or gradient, over the whole run
    bad_steps_in_a_row: int = 0
    samples_seen: int = 0  # over all ranks
    overflow_steps: int = 0  # fp16 steps skipped while the loss scale searched (also in skipped_steps)
    world_size: int = 1
    zero_stage: int = 0  # train.zero_stage, as asked (the engine's may differ: deepspeed_config.engine_stage)
    batches_per_epoch: int = 0  # of each rank
    data_order: dict = field(default_factory=dict)  # what decides the sample order (see data_order())
    loss_scaler: dict | None = None  # fp16: the GradScaler's state
    files: dict = field(default_factory=dict)  # relative path -> size in bytes, every rank's parts

    @classmethod
    def read(cls, directory: Path) -> "Progress":
        path = directory / META
        if not path.is_file():
            raise IncompleteCheckpointError(f"checkpoint {directory} has no {META}: it was not written to the end. "
                                            "Delete the directory to resume from the one before it.")
        known = set(cls.__dataclass_fields__)
        progress = cls(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})
        if isinstance(progress.files, list):  # written before sizes were recorded: existence only
            progress.files = {f: None for f in progress.files}
        return progress


def data_order(cfg, shards) -> dict:
    """Everything that decides which samples each rank reads in which order (besides the
    world size and epoch): an exact resume needs all of it unchanged. `shards`: the train
    ShardSet (its URLs and counts, so a manifest that changed under the same pattern counts)."""
    d = cfg.data
    listing = json.dumps([shards.urls, shards.counts]).encode()
    return {"seed": cfg.seed, "data.batch_size": d.batch_size, "data.num_workers": d.num_workers,
            "data.shuffle_buffer": d.shuffle_buffer, "data.samples_per_epoch": d.samples_per_epoch,
            "train.grad_accum": cfg.train.grad_accum,
            "data.train_shards": hashlib.sha256(listing).hexdigest()[:16]}


def order_changes(saved: Progress, now: Progress) -> list[str]:
    """What differs between a checkpoint and this run in what decides the sample order
    ([] = an exact resume is possible); each entry names the config key."""
    changed = []
    if saved.world_size != now.world_size:
        changed.append(f"ray.num_workers (world size) {saved.world_size} -> {now.world_size}")
    if saved.zero_stage != now.zero_stage:
        changed.append(f"train.zero_stage {saved.zero_stage} -> {now.zero_stage}")
    for key, value in now.data_order.items():
        if key in saved.data_order and saved.data_order[key] != value:
            what = "the shard list or its manifest" if key == "data.train_shards" else f"{saved.data_order[key]} -> {value}"
            changed.append(f"{key} {what}")
    return changed


def rank_state_path(directory: Path, rank: int) -> Path:
    return directory / "rank_state" / f"rank_{rank}.pt"


def _rng_state() -> dict:
    # plain tensors and tuples only, so that loading needs no unpickling of arbitrary objects
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def average_batchnorm_statistics(module: torch.nn.Module) -> None:
    """Trainable BatchNorm (`model.backbone_norm=bn`) keeps running statistics per rank:
    DeepSpeed broadcasts buffers only at the start. Before an evaluation or a save, every
    rank takes their mean, so that all ranks evaluate, and the files hold, one model.
    Collective."""
    with torch.no_grad():
        comm.average_([b for name, b in module.named_buffers()
                       if name.endswith(("running_mean", "running_var")) and b.is_floating_point()])


def _file_sizes(directory: Path) -> dict[str, int]:
    sizes = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = Path(root) / name
            sizes[str(path.relative_to(directory))] = path.stat().st_size
    return sizes


class WrittenLater:
    """What is left of one rank's save once `snapshot` returned: the portable state is
    assembled on rank 0 from the ranks' CPU copies (under ZeRO-1/2 one collective on the CPU
    group, comm.cpu_group, never the loop's), which writes portable.pt, then meta.json. It
    may run in a thread (engine/checkpoint_writer.py) while the next steps train, every
    rank's in the order of its saves; calling it is what makes the checkpoint complete."""

    def __init__(self, directory: Path, portable: PortableSnapshot, progress: Progress, other_files: dict[str, int],
                 group):
        self.directory, self.portable, self.progress, self.other_files = directory, portable, progress, other_files
        self.group = group

    def __call__(self) -> None:
        portable, self.portable = self.portable.assemble(self.group), None  # the copies go once assembled
        if portable is None:  # not rank 0: its files were written by `snapshot`
            return
        with atomic_open(self.directory / PORTABLE) as f:
            torch.save(portable, f)
        del portable  # the copy's memory goes as soon as it is on disk
        self.progress.files = {**self.other_files, PORTABLE: (self.directory / PORTABLE).stat().st_size}
        # meta.json last: its presence says the rest was written
        atomic_write_bytes(self.directory / META, json.dumps(asdict(self.progress), indent=1).encode())


def snapshot(directory: Path, engine, optimizer: torch.optim.Optimizer, progress: Progress) -> WrittenLater:
    """The part of a save the training must wait for. Collective: every rank calls it at the
    same step. Each rank writes its RNG state (small) into `directory` (its own local folder,
    which Ray merges; or one folder all ranks share); every rank copies its part of the
    portable state to the CPU (engine/portable.py: snapshot_portable). -> what is left: the
    state assembled on rank 0, which writes portable.pt, then meta.json."""
    rank = comm.get_rank()
    if rank == 0:  # a folder saved into before (the same step again): incomplete until rewritten
        (directory / META).unlink(missing_ok=True)
    average_batchnorm_statistics(engine.module)  # portable.pt holds every rank's mean statistics
    rank_file = rank_state_path(directory, rank)
    rank_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(rank_file) as f:
        torch.save(_rng_state(), f)
    portable = snapshot_portable(engine, optimizer)
    group = comm.cpu_group()  # made here, in the loop's thread, the first time (a collective)
    comm.barrier()  # every rank's RNG state written: the sizes listed below are final
    listed = comm.gather_object(_file_sizes(directory))
    others = {path: size for sizes in listed or [] for path, size in sizes.items()
              if path not in (META, PORTABLE) and not path.endswith(".tmp")}
    # a copy: the loop's Progress moves on while meta.json waits to be written
    return WrittenLater(directory, portable, copy.deepcopy(progress), others, group)


def save(directory: Path, engine, optimizer: torch.optim.Optimizer, progress: Progress) -> None:
    """Every rank writes its part of the checkpoint at `directory`, to the end (meta.json
    on rank 0 last). Collective: every rank calls it at the same step."""
    snapshot(directory, engine, optimizer, progress)()


def check_complete(directory: Path, progress: Progress) -> None:
    """Every file of every rank that meta.json lists is there, at its size."""
    problems = []
    for path, size in sorted(progress.files.items()):
        if not (directory / path).is_file():
            problems.append(f"{path} (missing)")
        elif size is not None and (directory / path).stat().st_size != size:
            problems.append(f"{path} ({(directory / path).stat().st_size} bytes, {size} written)")
    if problems:
        raise IncompleteCheckpointError(
            f"checkpoint {directory} is incomplete: {', '.join(problems)}. A worker died while saving or its "
            "upload failed; delete this directory to resume from the checkpoint before it.")


def restore_rng(directory: Path) -> None:
    """Same world size, stage and sample order: this rank's RNG, where it was (the weights
    and moments come from portable.pt, engine/portable.py)."""
    _set_rng_state(torch.load(rank_state_path(directory, comm.get_rank()), weights_only=True))
