"""On a GPU machine: one Ray worker trains a few steps in bf16 with the CUDA op."""
import pytest
import torch

from .ray_helpers import records, run_train, write_tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_one_gpu_worker_trains_in_bf16_with_the_cuda_op(tiny_data, tmp_path):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "gpu")
    done = run_train(config, "ray.num_workers=1", "ray.use_gpu=true", "train.precision=bf16",
                     "model.msda_backend=cuda", "train.max_steps=6", "train.zero_stage=2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = torch.tensor([r["loss"] for r in records(tmp_path / "runs" / "gpu", "train")])
    assert len(losses) == 6 and torch.isfinite(losses).all()
