"""The collective helpers own the device of their tensors; the suite's check mode
(DDETR_CHECK_COLLECTIVES=1, set by tests/conftest.py) refuses a tensor NCCL would refuse,
with a stand-in rule on CPUs: a tensor our code hands to a collective must come from
comm's own builder."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ddetr_dist import comm
from ddetr_dist.engine import evaluate


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_check_mode_is_on_in_the_test_suite():
    assert getattr(dist.all_reduce, "__wrapped_by_ddetr__", False)


def test_helpers_take_numbers_and_skip_the_collective_in_a_group_of_one(one_rank_group, monkeypatch):
    # a one-worker run has no one to hear from: gloo took 0.1-0.3 ms a collective, several a step
    def no_collective(*args, **kwargs):
        raise AssertionError("a collective in a group of one")

    for name in ("all_reduce", "all_gather_object", "gather_object", "broadcast_object_list", "barrier"):
        monkeypatch.setattr(dist, name, no_collective)
    assert comm.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert comm.all_reduce_max(3) == 3.0
    assert comm.any_rank(True) and not comm.any_rank(False)
    buffers = [torch.ones(3), torch.full((2, 2), 2.0)]
    comm.average_(buffers)
    assert torch.equal(buffers[1], torch.full((2, 2), 2.0))
    assert comm.all_gather_object({"a": 1}) == [{"a": 1}] and comm.gather_object(2) == [2]
    assert comm.broadcast_object("x") == "x"
    comm.barrier()


def test_a_tensor_built_by_the_caller_is_refused(one_rank_group):
    # what engine/evaluate.py did: torch.tensor(...) on the CPU, handed to an all-reduce;
    # under NCCL the first evaluation of every GPU run raised
    with pytest.raises(comm.CollectiveDeviceError, match="did not build"):
        comm.check_collective_tensors("all_reduce", [torch.tensor([1.0])], comm.__file__)
    comm.check_collective_tensors("all_reduce", [comm._backend_tensor([1.0])], comm.__file__)  # ours: fine


def test_a_collective_outside_comm_is_refused(one_rank_group):
    with pytest.raises(comm.CollectiveDeviceError, match="goes through ddetr_dist.comm"):
        comm.check_collective_tensors("all_reduce", [comm._backend_tensor([1.0])], evaluate.__file__)
    # DeepSpeed's and torch's own collectives carry the model's tensors: only the device rule
    comm.check_collective_tensors("all_reduce", [torch.ones(1)], dist.__file__)


def test_rank_0_decides_and_its_error_reaches_every_rank(one_rank_group):
    assert comm.decided_by_rank_0(lambda: {"resume": 3}) == {"resume": 3}
    with pytest.raises(FileNotFoundError, match="meta.json"):
        comm.decided_by_rank_0(lambda: (_ for _ in ()).throw(FileNotFoundError("meta.json")))
