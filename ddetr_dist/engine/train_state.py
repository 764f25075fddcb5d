"""Training checkpoints: what one holds, how each rank writes its part, how a run resumes.

A checkpoint is one directory (Ray merges every worker's files into it):

    meta.json                   step, epoch, position in the epoch, world size, ZeRO stage, counters
    deepspeed/<tag>/...         DeepSpeed's own files (model, optimizer; ZeRO shards keyed by rank)
    rank_state/rank_<r>.pt      each rank's RNG states (torch, python, numpy)
    portable.pt                 world-size-free: fp32 model + AdamW state by parameter name

Resuming with the same world size and ZeRO stage loads DeepSpeed's files and every rank's
RNG: bitwise the run that was interrupted. Any other world size or stage loads
`portable.pt` instead (ZeRO shards are keyed by rank and cannot be re-cut).

Every file of ours is written atomically and meta.json lists what the checkpoint must hold,
so a directory missing a part is refused by name rather than half-loaded.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ddetr_dist.atomic import atomic_open, atomic_write_bytes
from ddetr_dist.dist import comm

META = "meta.json"
PORTABLE = "portable.pt"
DEEPSPEED_DIR = "deepspeed"
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


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
    world_size: int = 1
    zero_stage: int = 0
    files: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, directory: Path) -> "Progress":
        path = directory / META
        if not path.is_file():
            raise IncompleteCheckpointError(f"checkpoint {directory} has no {META}: it was not written to the end. "
                                            "Delete the directory to resume from the one before it.")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})


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


def _full_param(p: torch.nn.Parameter) -> torch.Tensor:
    """The whole fp32 value of a parameter, however DeepSpeed partitioned it (collective
    under ZeRO: every rank calls this for every parameter in the same order)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(p) if p.requires_grad else None
    if full is None and hasattr(p, "ds_id"):  # a frozen ZeRO-3 parameter: gather it
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            full = p.detach().clone()
    return (full if full is not None else p.detach()).float().cpu()


def _full_optimizer_state(p: torch.nn.Parameter, optimizer: torch.optim.Optimizer, zero_stage: int) -> dict:
    from deepspeed.utils import safe_get_full_optimizer_state

    if zero_stage == 0:
        state = optimizer.state.get(p, {})
        return {k: state[k].detach().float().cpu() for k in ADAM_STATE_KEYS if k in state}
    out = {}
    for key in ADAM_STATE_KEYS:
        value = safe_get_full_optimizer_state(p, key)
        if value is not None:
            out[key] = value.float().cpu()
    return out


def _optimizer_step_count(optimizer: torch.optim.Optimizer) -> int:
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def relink_optimizer_fragments(engine) -> None:
    """DeepSpeed ZeRO-1/2 links each parameter to its slice of the optimizer state once,
    during the first step, while it steps the parameter groups one at a time: groups after
    the first have no state yet and stay linked to nothing (deepspeed 0.19, several groups).
    Link again now that every group has its state."""
    zero_optimizer = engine.optimizer
    if hasattr(zero_optimizer, "_hp_optimizer_states_linked") and zero_optimizer.optimizer.state:
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def portable_state(engine, optimizer: torch.optim.Optimizer, zero_stage: int) -> dict | None:
    """World-size-free model + optimizer state; collective, the result on rank 0 only."""
    rank0 = comm.get_rank() == 0
    module = engine.module
    relink_optimizer_fragments(engine)
    own = module.state_dict()  # the keys (and buffers) in the official order
    # shared heads appear under several keys: gather each parameter once
    params = dict(module.named_parameters(remove_duplicate=False))
    gathered: dict[int, torch.Tensor] = {}
    model, adam = {}, {}
    for name in own:
        p = params.get(name)
        if p is None:  # a buffer
            value = own[name].detach().cpu()
        elif id(p) in gathered:
            value = gathered[id(p)]
        else:
            value = gathered[id(p)] = _full_param(p)
            if p.requires_grad:
                state = _full_optimizer_state(p, optimizer, zero_stage)
                if state and rank0:
                    adam[name] = state
        if rank0:
            model[name] = value.clone()
    if not rank0:
        return None
    return {"model": model, "adam": adam, "adam_step": _optimizer_step_count(optimizer)}


def save(directory: Path, engine, optimizer: torch.optim.Optimizer, progress: Progress) -> None:
    """Every rank writes its part of the checkpoint at `directory` (its own local folder;
    Ray merges them). Collective: every rank calls it at the same step."""
    rank, world = comm.get_rank(), comm.get_world_size()
    tag = f"step_{progress.step}"
    (directory / DEEPSPEED_DIR / tag).mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=tag, save_latest=True)
    rank_file = rank_state_path(directory, rank)
    rank_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(rank_file) as f:
        torch.save(_rng_state(), f)
    portable = portable_state(engine, optimizer, progress.zero_stage)
    if rank == 0:
        with atomic_open(directory / PORTABLE) as f:
            torch.save(portable, f)
        progress.files = [PORTABLE, f"{DEEPSPEED_DIR}/{tag}"] + [
            str(rank_state_path(Path(), r)) for r in range(world)]
        # meta.json last: its presence says the rest was written
        atomic_write_bytes(directory / META, json.dumps(asdict(progress), indent=1).encode())


def check_complete(directory: Path, progress: Progress) -> None:
    missing = [f for f in progress.files if not (directory / f).exists()]
    if missing:
        raise IncompleteCheckpointError(
            f"checkpoint {directory} is incomplete: missing {', '.join(missing)}. A worker died while "
            "saving or its upload failed; delete this directory to resume from the checkpoint before it.")


def can_resume_exactly(progress: Progress, world_size: int, zero_stage: int) -> bool:
    return progress.world_size == world_size and progress.zero_stage == zero_stage


def load_portable_model(directory: Path, module: torch.nn.Module) -> dict:
    """Before deepspeed.initialize: the fp32 weights into `module`; -> the portable state."""
    portable = torch.load(directory / PORTABLE, map_location="cpu", weights_only=True)
    module.load_state_dict(portable["model"], strict=True)
    return portable


def load_portable_optimizer(portable: dict, engine, optimizer: torch.optim.Optimizer, zero_stage: int) -> None:
    """After deepspeed.initialize: the AdamW moments of every parameter, re-cut for this
    world size. DeepSpeed creates optimizer state lazily, so first take one step with zero
    gradients at lr 0 (changes no weight), then overwrite the moments and the step count."""
    from deepspeed.utils import safe_set_full_optimizer_state

    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    engine.backward(sum(p.sum() * 0.0 for _, p in trainable))
    engine.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    relink_optimizer_fragments(engine)
    for name, p in trainable:
        state = portable["adam"].get(name)
        if state is None:
            continue
        for key, value in state.items():
            if zero_stage == 0:
                optimizer.state[p][key].copy_(value.to(optimizer.state[p][key]))
            else:
                safe_set_full_optimizer_state(p, value, key)
    for state in optimizer.state.values():  # AdamW's bias correction depends on the step count
        if torch.is_tensor(state.get("step")):
            state["step"].fill_(portable["adam_step"])
        elif "step" in state:
            state["step"] = portable["adam_step"]


def restore(directory: Path, engine, progress: Progress) -> None:
    """Same world size and stage: DeepSpeed's own files and this rank's RNG, exactly."""
    tag = f"step_{progress.step}"
    path, _ = engine.load_checkpoint(str(directory / DEEPSPEED_DIR), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise IncompleteCheckpointError(f"DeepSpeed could not load {directory / DEEPSPEED_DIR / tag}")
    _set_rng_state(torch.load(rank_state_path(directory, comm.get_rank()), weights_only=True))
