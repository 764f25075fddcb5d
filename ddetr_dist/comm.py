"""Every rank/world/barrier/gather helper lives here. Only torch.distributed: the model and
data code may import this without pulling in Ray or DeepSpeed. With no process group
(a notebook, a unit test) everything degrades to a single process.

The helpers take and return Python numbers and objects, never tensors: the tensor a
collective needs is built here, on the device the backend takes (NCCL only takes CUDA
tensors, gloo CPU ones), so that no caller can build it on the wrong one.

`DDETR_CHECK_COLLECTIVES=1` (the test suite sets it) checks every collective call: its
tensors must be on the backend's device, and a tensor handed to a collective by our own
code must have been built by `_backend_tensor` (on CPUs, where gloo takes any tensor, this
stands in for NCCL's rule, so a CPU test run catches a tensor that a GPU run would reject).
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Sequence

import torch
import torch.distributed as dist

CHECK_ENV = "DDETR_CHECK_COLLECTIVES"
_BUILT_HERE = "_ddetr_backend_tensor"  # the tag _backend_tensor puts on its tensors


class CollectiveDeviceError(RuntimeError):
    """A collective got a tensor on a device its backend does not take."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _alone() -> bool:
    """No other rank to hear from: no process group, or a group of one (a one-worker run,
    the benchmark). The helpers below then return their own values without a collective
    (gloo takes about 0.1-0.3 ms for one, and the loop runs several a step)."""
    return get_world_size() == 1


def backend_device() -> torch.device:
    """The device whose tensors the process group's collectives take."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _backend_tensor(values: Sequence[float] | torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """The one place a tensor for a collective is built (a copy, on the backend's device)."""
    if torch.is_tensor(values):
        tensor = values.detach().to(device=backend_device(), dtype=dtype, copy=True)
    else:
        tensor = torch.tensor(list(values), dtype=dtype, device=backend_device())
    setattr(tensor, _BUILT_HERE, True)
    return tensor


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over ranks (the values themselves on one process)."""
    if _alone():
        return [float(v) for v in values]
    tensor = _backend_tensor(values)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def sum_over_group(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """A copy of `tensor` summed over the ranks of `group` (default: all), on `tensor`'s device;
    no host sync (DeepSpeed's data-parallel group for its gradient norm)."""
    if not is_distributed():
        return tensor.clone()
    summed = _backend_tensor(tensor, dtype=tensor.dtype)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    return summed.to(tensor.device)


def all_reduce_max(value: float) -> float:
    """The largest `value` over ranks."""
    if _alone():
        return float(value)
    tensor = _backend_tensor([value])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def average_(tensors: list[torch.Tensor]) -> None:
    """Each tensor replaced, in place, by its mean over ranks (one collective for all)."""
    if _alone() or not tensors:
        return
    flat = _backend_tensor(torch.cat([t.detach().reshape(-1).double() for t in tensors]))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank: a decision all ranks take
    together (skip a step, stop), so that none waits in a collective the others skipped."""
    return all_reduce_max(1.0 if flag else 0.0) > 0


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] (works with any picklable object)."""
    if _alone():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """[obj of rank 0, obj of rank 1, ...] on rank `dst` only (None elsewhere): one copy of
    everything on one rank, not on all."""
    if _alone():
        return [obj]
    out: list[Any] | None = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def barrier() -> None:
    if not _alone():
        dist.barrier()


_cpu_group: tuple = (None, None)  # (the default group it was made for, the gloo group)


def cpu_group():
    """A gloo group of every rank, for collectives on CPU tensors outside the loop's thread
    (a checkpoint assembled in the background): one group's collectives must come in one
    order on every rank, and the loop's own go through the default group. Collective the
    first time (every rank calls it at the same point); None without a process group."""
    global _cpu_group
    if not is_distributed():
        return None
    default = dist.distributed_c10d._get_default_group()
    if _cpu_group[0] is not default:  # a new process group (tests, the benchmark): a new side group
        _cpu_group = (default, dist.new_group(backend="gloo"))
    return _cpu_group[1]


def cpu_group_zeros(numel: int) -> torch.Tensor:
    """The one place a tensor for cpu_group()'s collectives is built: fp32 zeros on the CPU
    (gloo's device, whatever the default group's backend)."""
    tensor = torch.zeros(numel, dtype=torch.float32)
    setattr(tensor, _BUILT_HERE, True)
    return tensor


def reduce_sum_to_rank_0_(tensor: torch.Tensor, group) -> None:
    """In place: on rank 0 `tensor` (from cpu_group_zeros) becomes the sum of every rank's;
    `group` from cpu_group()."""
    if is_distributed():
        dist.reduce(tensor, dst=0, group=group)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank."""
    if _alone():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def decided_by_rank_0(decide) -> Any:
    """`decide()` run on rank 0 only, its result on every rank: for a run-level decision
    that precedes a collective (resume from where, evaluate or not) and reads something
    ranks may see differently (files on NFS). An exception on rank 0 is raised on every
    rank, with rank 0's message, instead of leaving the others waiting."""
    outcome: tuple[bool, Any] = (True, None)
    if get_rank() == 0:
        try:
            outcome = (True, decide())
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            outcome = (False, e)
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value


# ---------------------------------------------------------------- the device check (tests)

_CHECKED = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "gather", "scatter",
            "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv",
            "isend", "irecv")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))  # ddetr_dist/


def _tensors(args, kwargs) -> list[torch.Tensor]:
    found = []
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found += [v for v in value if torch.is_tensor(v)]
    return found


def check_collective_tensors(name: str, tensors: list[torch.Tensor], caller_file: str, group=None) -> None:
    """Raise CollectiveDeviceError when `name` (called from `caller_file`, on `group`: None
    is the default one) gets a tensor its backend would reject on a GPU cluster."""
    if not is_distributed():
        return
    if dist.get_backend(group) == "nccl":
        wrong = [t for t in tensors if t.device.type != "cuda"]
        if wrong:
            raise CollectiveDeviceError(f"torch.distributed.{name} under NCCL got a tensor on {wrong[0].device} "
                                        f"(called from {caller_file}): NCCL takes CUDA tensors only")
    if not os.path.abspath(caller_file).startswith(_PACKAGE_DIR + os.sep):
        return  # DeepSpeed's and torch's own collectives: their tensors are the model's
    if os.path.abspath(caller_file) != os.path.abspath(__file__):
        raise CollectiveDeviceError(f"torch.distributed.{name} called from {caller_file}: every collective of "
                                    "ddetr_dist goes through ddetr_dist.comm, which builds its tensors on the "
                                    "backend's device")
    stray = [t for t in tensors if not getattr(t, _BUILT_HERE, False)]
    if stray:
        raise CollectiveDeviceError(f"torch.distributed.{name} got a tensor that comm._backend_tensor did not build: "
                                    "one built by the caller lives on the CPU, which NCCL rejects")


def _checked(name: str, collective):
    @functools.wraps(collective)
    def call(*args, **kwargs):
        check_collective_tensors(name, _tensors(args, kwargs), sys._getframe(1).f_code.co_filename,
                                 kwargs.get("group"))
        return collective(*args, **kwargs)

    call.__wrapped_by_ddetr__ = True
    return call


def install_collective_checks() -> None:
    """Wrap torch.distributed's tensor collectives with `check_collective_tensors` (once per
    process). Callers that look them up as `torch.distributed.<name>` (ours, DeepSpeed's)
    are checked; torch's internal calls are not."""
    for name in _CHECKED:
        collective = getattr(dist, name, None)
        if collective is not None and not getattr(collective, "__wrapped_by_ddetr__", False):
            setattr(dist, name, _checked(name, collective))


if os.environ.get(CHECK_ENV) == "1":
    install_collective_checks()
