"""On a GPU machine (`make test-gpu`, run by `make gpu-check`): `ddetr train` with one Ray
worker on the GPU, so the process group is NCCL, which takes only CUDA tensors: every
collective of the loop (finite-loss votes, gradient reduction, checkpoints) and of the
evaluation (loss totals, detections) must build its tensors on the GPU. A GPU machine of
this project has one GPU; NCCL's device rules hold at world size 1 too.

Each precision runs with gradient accumulation and an evaluation mid-run (an epoch end)
and at the end, with the CUDA op forced: no silent fallback to the torch reference, and an
error if the model's tensors were not on the GPU."""
import math

import pytest
import torch

from .ray_helpers import records, run_train, write_tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STEPS = 6
# one worker, batch 2, 16 samples an epoch, 2 micro-batches a step: 4 steps an epoch, so the
# epoch-end evaluation comes at step 4 and the final one at step 6
EPOCH_STEPS = 4


# one GPU, one rank: ZeRO-1/2 would run as stage 0 (deepspeed_config.engine_stage); ZeRO-3 keeps
# its partitioned parameters and their NCCL gathers on one rank too
@pytest.mark.parametrize("precision, zero_stage", [("bf16", 3), ("fp16", 0)], ids=["bf16-zero3", "fp16-zero0"])
def test_one_gpu_worker_trains_and_evaluates_under_nccl(tiny_data, tmp_path, precision, zero_stage):
    name = f"gpu-{precision}"
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", name)
    done = run_train(config, "ray.num_workers=1", "ray.use_gpu=true", f"train.precision={precision}",
                     f"train.zero_stage={zero_stage}", "train.grad_accum=2", "model.msda_backend=cuda",
                     f"train.max_steps={STEPS}", "data.samples_per_epoch=16", "train.eval_every_epochs=1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "runs" / name

    [final] = records(run_dir, "final")
    assert final["step"] == STEPS
    if precision == "bf16":  # fp16 may skip a step that overflowed: what loss scaling is for
        assert final["skipped_steps"] == 0
    train = records(run_dir, "train")
    assert len(train) >= STEPS - final["skipped_steps"]  # a line per step (train.log_every_steps=1)
    for record in train:
        for key, value in record.items():
            if key.startswith("loss"):
                assert math.isfinite(value), (key, record)

    evals = records(run_dir, "eval")
    assert [r["step"] for r in evals] == [EPOCH_STEPS, STEPS]
    for record in evals:
        assert record["images"] == 8  # the tiny data's val images, all of them
        assert math.isfinite(record["val_loss"]) and math.isfinite(record["AP"])
