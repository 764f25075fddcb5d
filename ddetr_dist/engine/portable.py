"""The world-size-free form of a checkpoint (`portable.pt`): the fp32 model and the AdamW
state by parameter name, gathered from however DeepSpeed partitioned them, and loaded back
re-cut for any world size and ZeRO stage. It is a checkpoint's only copy of the weights
(engine/train_state.py): every resume, exact or resized (engine/resume.py), loads it, and
`model_final.pth` (engine/final_outputs.py) is its model."""
from __future__ import annotations

from pathlib import Path

import torch

from ddetr_dist import comm

PORTABLE = "portable.pt"
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


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


def load_portable_optimizer(portable: dict, engine, optimizer: torch.optim.Optimizer, zero_stage: int) -> None:
    """After deepspeed.initialize: the AdamW moments of every parameter, re-cut for this
    world size. DeepSpeed creates optimizer state lazily, so first take one step with zero
    gradients at lr 0 (changes no weight, not one bit: AdamW multiplies by 1 - 0 * weight
    decay and adds -0.0 * m / (sqrt(v) + eps); an exact resume relies on it), or under
    ZeRO-3 (whose partitioned parameters cannot take that backward) create the state AdamW
    would; then overwrite the moments and the step count."""
    from deepspeed.utils import safe_set_full_optimizer_state

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
