"""The CUDA kernels compile with a bare `nvcc -c` (no torch headers, no torch build
system) for Ampere and Hopper. Needs nvcc, not a GPU."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from ddetr_dist.ops import build

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (no CUDA toolkit on this machine)")
def test_cuda_kernels_compile_with_plain_nvcc(tmp_path):
    source = build.SOURCE_DIR / build.CUDA_SOURCES[0]
    output = tmp_path / "msda_cuda.o"
    result = subprocess.run(
        [NVCC, "-c", str(source), "-o", str(output), "-O3", "-std=c++17", "-Werror", "all-warnings",
         "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert output.stat().st_size > 0
    symbols = subprocess.run(["nm", "-C", str(output)], capture_output=True, text=True).stdout
    for entry in ("msda::forward_cuda", "msda::backward_cuda"):
        assert entry in symbols, f"{entry} not defined in the object"
