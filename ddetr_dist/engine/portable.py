"""The world-size-free form of a checkpoint (`portable.pt`): the fp32 model and the AdamW
state by parameter name, gathered from however DeepSpeed partitioned them, and loaded back
re-cut for any world size and ZeRO stage. It is a checkpoint's only copy of the weights
(engine/train_state.py): every resume, exact or resized (engine/resume.py), loads it, and
`model_final.pth` (engine/final_outputs.py) is its model.

Where the state lives depends on the ZeRO stage the engine runs at, which the functions here
ask the engine itself: a one-rank ZeRO-1/2 run's engine is ZeRO-0 (deepspeed_config.engine_stage),
and DeepSpeed's getters and setters return None or do nothing for state its optimizer does not
hold, so a stage taken from the config would lose the AdamW state without a word."""
from __future__ import annotations

from pathlib import Path

import torch

from ddetr_dist import comm

PORTABLE = "portable.pt"
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def _own_cpu_copy(value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`value` (fp32, on the CPU) as a tensor nobody else writes to. On a CPU run
    `.float().cpu()` hands back the live parameter or moment itself; a checkpoint written in
    the background (engine/checkpoint_writer.py) while the next steps update it in place
    would mix steps. A copy made on the way (a GPU tensor, a ZeRO gather) is not copied again."""
    if value.data_ptr() == source.data_ptr() or value._base is not None:
        return value.clone()
    return value


def _full_param(p: torch.nn.Parameter) -> torch.Tensor:
    """The whole fp32 value of a parameter, however DeepSpeed partitioned it (collective
    under ZeRO: every rank calls this for every parameter in the same order); a private copy."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(p) if p.requires_grad else None
    if full is None and hasattr(p, "ds_id"):  # a frozen ZeRO-3 parameter: gather it
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            full = p.detach().clone()
    return _own_cpu_copy((full if full is not None else p.detach()).float().cpu(), p)


def _full_optimizer_state(p: torch.nn.Parameter, optimizer: torch.optim.Optimizer, zero_stage: int) -> dict:
    from deepspeed.utils import safe_get_full_optimizer_state

    if zero_stage == 0:
        state = optimizer.state.get(p, {})
        return {k: _own_cpu_copy(state[k].detach().float().cpu(), state[k]) for k in ADAM_STATE_KEYS if k in state}
    out = {}
    for key in ADAM_STATE_KEYS:
        value = safe_get_full_optimizer_state(p, key)
        if value is not None:
            out[key] = _own_cpu_copy(value.float().cpu(), value)
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


class PortableSnapshot:
    """The portable state as it was at one step, on the CPU, taken by `snapshot_portable`.
    Under ZeRO-1/2 each rank holds only its own fragments of the fp32 parameters and AdamW
    moments (a copy of 1/world of them: quick, no collective); `assemble` sums them onto
    rank 0 in one collective on the CPU group (comm.cpu_group) instead of DeepSpeed's one
    per parameter and state, so it may run in a checkpoint's background thread."""

    FLAT_KEYS = (None,) + ADAM_STATE_KEYS  # segments of the flat buffer: fp32 value, then each moment

    def __init__(self, names: list[str], adam_step: int):
        self.names = names  # the state dict's keys, in the official order
        self.model: dict[str, torch.Tensor] = {}  # rank 0: values copied whole (buffers, ZeRO-0, ZeRO-3)
        self.adam: dict[str, dict] = {}
        self.adam_step = adam_step
        self.layout: dict[str, tuple[int, torch.Size, bool]] = {}  # ZeRO-1/2: name -> (offset, shape, with adam)
        self.fragments: list[tuple[int, int, torch.Tensor]] = []  # (segment, offset, this rank's piece)
        self.flat_numel = 0

    def add_fragments(self, name: str, p: torch.nn.Parameter, with_adam: bool) -> None:
        """This rank's fragments of ZeRO-1/2 parameter `p` (DeepSpeed's `_hp_mapping`)."""
        self.layout[name] = (self.flat_numel, p.shape, with_adam)
        mapping = p._hp_mapping
        if mapping is not None:  # else the other ranks hold all of it
            start = self.flat_numel + mapping.lp_fragment_address.start
            for segment, key in enumerate(self.FLAT_KEYS):
                piece = mapping.get_hp_fragment(key).detach()
                self.fragments.append((segment, start, _own_cpu_copy(piece.float().cpu().flatten(), piece)))
        self.flat_numel += p.numel()

    def assemble(self, group=None) -> dict | None:
        """Collective on `group` when there are fragments: -> {'model', 'adam', 'adam_step'}
        on rank 0, None elsewhere."""
        model, adam = dict(self.model), dict(self.adam)
        if self.layout:
            n = self.flat_numel
            flat = comm.cpu_group_zeros(len(self.FLAT_KEYS) * n)
            for segment, start, piece in self.fragments:
                flat[segment * n + start:segment * n + start + piece.numel()] = piece
            self.fragments = []
            comm.reduce_sum_to_rank_0_(flat, group if group is not None else comm.cpu_group())
            if comm.get_rank() != 0:
                return None
            for name, (offset, shape, with_adam) in self.layout.items():
                # clones: a view would save the whole flat buffer with each tensor
                def value(segment: int) -> torch.Tensor:
                    begin = segment * n + offset
                    return flat[begin:begin + shape.numel()].view(shape).clone()

                model[name] = value(0)
                if with_adam:
                    adam[name] = {key: value(i + 1) for i, key in enumerate(ADAM_STATE_KEYS)}
        if comm.get_rank() != 0:
            return None
        return {"model": {name: model[name] for name in self.names}, "adam": adam, "adam_step": self.adam_step}


def snapshot_portable(engine, optimizer: torch.optim.Optimizer) -> PortableSnapshot:
    """The part of `portable_state` the training must wait for. Collective under ZeRO-3 only
    (its parameters are gathered here); ZeRO-1/2 keep this rank's fragments for `assemble`."""
    zero_stage = engine.zero_optimization_stage()
    rank0 = comm.get_rank() == 0
    module = engine.module
    relink_optimizer_fragments(engine)
    own = module.state_dict()  # the keys (and buffers) in the official order
    snap = PortableSnapshot(list(own), _optimizer_step_count(optimizer))
    # shared heads appear under several keys: take each parameter once
    params = dict(module.named_parameters(remove_duplicate=False))
    first_name: dict[int, str] = {}
    for name in own:
        p = params.get(name)
        if p is not None and id(p) in first_name:
            shared = first_name[id(p)]
            if shared in snap.layout:
                snap.layout[name] = snap.layout[shared][:2] + (False,)
            elif rank0:
                snap.model[name] = snap.model[shared]
            continue
        if p is None:  # a buffer
            if rank0:
                snap.model[name] = _own_cpu_copy(own[name].detach().cpu(), own[name])
            continue
        first_name[id(p)] = name
        if p.requires_grad and zero_stage in (1, 2) and hasattr(p, "_hp_mapping"):
            snap.add_fragments(name, p, with_adam=True)
            continue
        value = _full_param(p)
        state = _full_optimizer_state(p, optimizer, zero_stage) if p.requires_grad else {}
        if rank0:
            snap.model[name] = value
            if state:
                snap.adam[name] = state
    return snap


def portable_state(engine, optimizer: torch.optim.Optimizer) -> dict | None:
    """World-size-free model + optimizer state; collective, the result on rank 0 only. Every
    tensor in it is a CPU copy of its own: the training may go on while it is written."""
    return snapshot_portable(engine, optimizer).assemble()


def load_portable_model(directory: Path, module: torch.nn.Module) -> dict:
    """Before deepspeed.initialize: the fp32 weights into `module`; -> the portable state."""
    portable = torch.load(directory / PORTABLE, map_location="cpu", weights_only=True)
    module.load_state_dict(portable["model"], strict=True)
    return portable


def _create_zero3_adam_state(engine) -> None:
    """The state torch's AdamW creates at its first step, for each flat fp32 partition of
    ZeRO-3 (the tensors its optimizer steps; deepspeed 0.19 `fp32_partitioned_groups_flat`)."""
    zero3 = engine.optimizer
    for flat in zero3.fp32_partitioned_groups_flat:
        if not zero3.optimizer.state.get(flat):
            zero3.optimizer.state[flat] = {"step": torch.zeros((), dtype=torch.float32),
                                           "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}


def _set_zero3_optimizer_state(zero3, p: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
    """This rank's slice of `value` into its ZeRO-3 partition of state `key`. DeepSpeed's own
    setter (0.19 `set_full_hp_param`) reads past the end of a parameter whose last partition
    is padded (7 elements on 2 ranks: 4 + 3 and 1 of padding); the padding stays zero, as the
    zero gradients of the padding leave it in the run that saved."""
    partition, _ = zero3._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    start = partition.numel() * zero3._get_param_partition_rank(p)
    piece = value.flatten()[start:start + partition.numel()]
    partition.data.zero_()
    partition.data[:piece.numel()].copy_(piece.to(partition))


def load_portable_optimizer(portable: dict, engine, optimizer: torch.optim.Optimizer) -> None:
    """After deepspeed.initialize: the AdamW moments of every parameter, re-cut for this
    world size. DeepSpeed creates optimizer state lazily, so first take one step with zero
    gradients at lr 0 (changes no weight, not one bit: AdamW multiplies by 1 - 0 * weight
    decay and adds -0.0 * m / (sqrt(v) + eps); an exact resume relies on it), or under
    ZeRO-3 (whose partitioned parameters cannot take that backward) create the state AdamW
    would; then overwrite the moments and the step count."""
    from deepspeed.utils import safe_set_full_optimizer_state

    zero_stage = engine.zero_optimization_stage()
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if zero_stage == 3:
        _create_zero3_adam_state(engine)
    else:
        lrs = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        # a boundary whatever train.grad_accum is: only a boundary step makes the state
        engine.set_gradient_accumulation_boundary(True)
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
            elif zero_stage == 3:
                _set_zero3_optimizer_state(engine.optimizer, p, value, key)
            else:
                safe_set_full_optimizer_state(p, value, key)
    for state in optimizer.state.values():  # AdamW's bias correction depends on the step count
        if torch.is_tensor(state.get("step")):
            state["step"].fill_(portable["adam_step"])
        elif "step" in state:
            state["step"] = portable["adam_step"]
