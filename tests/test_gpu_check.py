"""`make gpu-check` (tools/gpu_check.py) where this suite runs, on CPUs: it refuses a machine
without a GPU at once, and the pieces of its GPU path that a CPU can run do run (the JUnit
counts, `ddetr bench train --synthetic`)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddetr_dist.cli import main
from engine.engine_helpers import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refuses_a_machine_without_a_gpu_before_doing_anything(tmp_path):
    # no visible GPU on a GPU machine too: the same answer, from a CUDA build of torch
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DDETR_GPU_CHECK_DIR": str(tmp_path / "report")}
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "gpu-check: no CUDA GPU here" in done.stderr and "nothing was built or run" in done.stderr
    assert not (tmp_path / "report").exists()  # no report, no build: it stopped first
    assert time.monotonic() - start < 60


def test_junit_counts(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<?xml version="1.0"?><testsuites><testsuite tests="4" failures="1" errors="0" skipped="1" time="12.5">'
        '<testcase classname="tests.a" name="ok"/>'
        '<testcase classname="tests.a" name="also_ok"/>'
        '<testcase classname="tests.a" name="broken"><failure message="boom"/></testcase>'
        '<testcase classname="tests.b" name="two_gpus"><skipped message="needs two GPUs"/></testcase>'
        '</testsuite></testsuites>')
    counts = load_gpu_check().junit_counts(junit)
    assert counts == {"passed": 2, "failed": 1, "skipped": 1, "pytest_seconds": 12.5,
                      "failed_tests": ["tests.a::broken"], "skipped_tests": ["tests.b::two_gpus: needs two GPUs"]}


@pytest.mark.slow
def test_bench_train_on_synthetic_images(tmp_path):
    """What gpu-check's training step runs, on a tiny model on the CPU."""
    out = tmp_path / "bench_train.json"
    assert main(["bench", "train", "--steps", "1", "--synthetic", "64x96", "--json", str(out),
                 *TINY_OVERRIDES, "train.precision=bf16", "data.batch_size=1"]) == 0
    result = json.loads(out.read_text())
    [row] = result["rows"]
    assert result["synthetic"] == [64, 96] and result["precision"] == "bf16"
    assert row["images_per_s"] > 0
    assert (row["peak_gpu_memory_gb"] is not None) == torch.cuda.is_available()


def test_bench_train_runs_the_base_model_eager_and_compiled_in_bf16(tmp_path):
    """gpu-check's training row: eager and compiled (train.compile) images/s in one run."""
    command = load_gpu_check().bench_train_command(tmp_path / "out.json")
    assert command[command.index("--config") + 1] == "configs/base.yaml"
    assert {"--compile", "--synthetic", "train.precision=bf16", "model.msda_backend=cuda"} <= set(command)
    import argparse

    from ddetr_dist.on_ray import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_intermixed_args(command[command.index("train") + 1:])  # what `ddetr bench train` reads
    assert args.compile and args.synthetic == (800, 1333) and "train.precision=bf16" in args.overrides
