"""Choice of backend: automatic by device, overridden by DDETR_MSDA_BACKEND and by the
backend= argument (argument first), clear errors for unknown or unusable backends, and
the automatic fallback to the reference when the extension cannot be built."""
from __future__ import annotations

import logging

import pytest
import torch

from msda_cases import make_inputs
from ddetr_dist.ops import BackendUnavailableError, build, dispatch, ms_deform_attn, resolve_backend

ENV = dispatch.ENV_VAR


@pytest.fixture
def calls(monkeypatch):
    """Records which implementation ms_deform_attn ran: 'torch' or 'compiled'."""
    seen = []

    def spy(name, real):
        def wrapper(*args, **kwargs):
            seen.append(name)
            return real(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(dispatch, "ms_deform_attn_torch", spy("torch", dispatch.ms_deform_attn_torch))
    monkeypatch.setattr(dispatch, "ms_deform_attn_compiled", spy("compiled", dispatch.ms_deform_attn_compiled))
    return seen


@pytest.fixture
def broken_build(monkeypatch):
    """The extension fails to build (as on a machine without a compiler)."""
    def fail():
        raise build.BuildError("could not build the MSDA extension: c++: command not found")
    monkeypatch.setattr(build, "get_extension", fail)
    monkeypatch.setattr(dispatch, "_warned_fallback", False)


def test_auto_picks_the_compiled_cpu_kernel(monkeypatch, calls):
    monkeypatch.delenv(ENV, raising=False)
    assert resolve_backend(None, "cpu") == "cpu"
    ms_deform_attn(**make_inputs())
    assert calls == ["compiled"]


def test_env_var_selects_the_backend(monkeypatch, calls):
    monkeypatch.setenv(ENV, "torch")
    ms_deform_attn(**make_inputs())
    monkeypatch.setenv(ENV, " CPU ")  # case and spaces do not matter
    ms_deform_attn(**make_inputs())
    assert calls == ["torch", "compiled"]


def test_argument_overrides_env_var(monkeypatch, calls):
    monkeypatch.setenv(ENV, "torch")
    ms_deform_attn(**make_inputs(), backend="cpu")
    monkeypatch.setenv(ENV, "cpu")
    ms_deform_attn(**make_inputs(), backend="torch")
    assert calls == ["compiled", "torch"]


def test_unknown_backend_lists_the_valid_ones(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*valid backends: auto, cuda, cpu, torch"):
        ms_deform_attn(**make_inputs(), backend="fast")
    monkeypatch.setenv(ENV, "triton")
    with pytest.raises(ValueError, match=rf"unknown backend 'triton' \(from {ENV}='triton'\)"):
        ms_deform_attn(**make_inputs())


def test_cuda_on_a_cpu_only_torch_says_why_and_how_to_fall_back(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)  # what a CPU build of torch reports
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda'.*CPU-only build.*backend='torch'"):
        resolve_backend("cuda", "cpu")


def test_compiled_backend_on_the_wrong_device_is_refused():
    with pytest.raises(BackendUnavailableError, match=r"backend 'cpu'.*runs on cpu tensors.*value is on cuda"):
        resolve_backend("cpu", "cuda")


def test_named_backend_that_cannot_be_built_raises_with_the_build_error(broken_build):
    with pytest.raises(BackendUnavailableError, match=r"c\+\+: command not found"):
        ms_deform_attn(**make_inputs(), backend="cpu")


def test_auto_falls_back_to_torch_with_one_warning(broken_build, calls, caplog, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    inputs = make_inputs()
    with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
        first = ms_deform_attn(**inputs)
        ms_deform_attn(**inputs)
    assert calls == ["torch", "torch"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "command not found" in warnings[0].getMessage()
    torch.testing.assert_close(first, dispatch.ms_deform_attn_torch(**inputs))


def test_devices_without_a_kernel_use_the_reference(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert resolve_backend(None, "mps") == "torch"


def test_a_failing_compile_is_reported_with_the_compiler_output(tmp_path, monkeypatch):
    sources = tmp_path / "csrc"
    sources.mkdir()
    for name in build.CPU_SOURCES + build.CUDA_SOURCES:
        (sources / name).write_text("#error broken on purpose\n")
    monkeypatch.setattr(build, "SOURCE_DIR", sources)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    with pytest.raises(build.BuildError, match=r"(?s)could not build the MSDA extension.*broken on purpose"
                                               r".*backend='torch' or DDETR_MSDA_BACKEND=torch"):
        build._build_and_load(verbose=False)
