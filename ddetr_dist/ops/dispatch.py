"""ms_deform_attn: the op with the official signature, and the choice of backend.

Backends:
  cuda   the compiled CUDA kernels (value on a GPU; needs a CUDA build of torch + CUDA_HOME)
  cpu    the compiled CPU kernels (value on the CPU)
  torch  the pure-PyTorch reference (any device; slow)

The choice, first match wins: the `backend=` argument, the DDETR_MSDA_BACKEND environment
variable, else "auto": the compiled kernel for the value's device. When the extension
cannot be built, "auto" falls back to `torch` with one logged warning on the CPU, but on a
GPU raises BackendUnavailableError with the compiler's message: the reference is many
times slower, and a run of many GPUs should not drift into it unnoticed (choose it
explicitly with backend="torch" / DDETR_MSDA_BACKEND=torch). A compiled backend asked
for by name that cannot be used raises BackendUnavailableError saying what failed and
how to fall back.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from ddetr_dist.errors import NotRetryable

from . import build
from .checks import check_ms_deform_attn_inputs
from .compiled import ms_deform_attn_compiled
from .levels import SpatialShapes, level_shapes, level_starts
from .reference import ms_deform_attn_torch

logger = logging.getLogger(__name__)

ENV_VAR = "DDETR_MSDA_BACKEND"
BACKENDS = ("cuda", "cpu", "torch")
CHOICES = ("auto",) + BACKENDS


class BackendUnavailableError(NotRetryable):
    """A compiled backend (asked for by name, or the automatic one on a GPU) cannot run
    here. NotRetryable: a restarted worker on the same node rebuilds, fails the same way,
    and would do so ray.max_failures times over."""


_warned_fallback = False


def _warn_fallback_once(reason: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        logger.warning("ms_deform_attn: using the slow pure-PyTorch backend: %s", reason)


def _requested(backend: str | None) -> tuple[str, str]:
    """(the requested name, where it came from)."""
    if backend is not None:
        return backend.strip().lower(), f"backend={backend!r}"
    from_env = os.environ.get(ENV_VAR, "").strip().lower()
    if from_env:
        return from_env, f"{ENV_VAR}={os.environ[ENV_VAR]!r}"
    return "auto", "default"


# The answer depends only on the arguments, the environment and whether the build
# works, none of which change while a compiled graph is in use: torch.compile calls
# this once while tracing and keeps the result instead of tracing into the build.
@torch.compiler.assume_constant_result
def resolve_backend(backend: str | None, device_type: str) -> str:
    """The backend that will run for a value on `device_type` ("cpu", "cuda", ...)."""
    name, source = _requested(backend)
    if name not in CHOICES:
        raise ValueError(f"ms_deform_attn: unknown backend {name!r} (from {source}); "
                         f"valid backends: {', '.join(CHOICES)}")
    if name == "torch":
        return name
    if name == "auto":
        if device_type not in ("cpu", "cuda"):
            return "torch"
        try:
            extension = build.get_extension()
        except build.BuildError as error:
            if device_type == "cuda":
                raise BackendUnavailableError(f"ms_deform_attn: the compiled op for GPU tensors is unavailable: "
                                              f"{error}") from error
            _warn_fallback_once(str(error))
            return "torch"
        if device_type == "cuda" and not extension.with_cuda:
            raise BackendUnavailableError(f"ms_deform_attn: the compiled op has no CUDA kernels: "
                                          f"{build.cuda_build_possible()[1] or 'built without them'}. "
                                          f"Make a CUDA toolkit available, or {build.FALLBACK_HINT}.")
        return device_type
    if name == "cuda":
        possible, why = build.cuda_build_possible()
        if not possible:
            raise BackendUnavailableError(f"ms_deform_attn: backend 'cuda' (from {source}) is unavailable: {why}. "
                                          f"Use backend='cpu' for CPU tensors, or {build.FALLBACK_HINT}.")
    if device_type != name:
        raise BackendUnavailableError(f"ms_deform_attn: backend {name!r} (from {source}) runs on {name} tensors, "
                                      f"but value is on {device_type}; move the tensors, or {build.FALLBACK_HINT}.")
    try:
        build.get_extension()
    except build.BuildError as error:
        raise BackendUnavailableError(f"ms_deform_attn: backend {name!r} (from {source}) is unavailable: "
                                      f"{error}") from error
    return name


def ms_deform_attn(value: Tensor, spatial_shapes: SpatialShapes, level_start_index: Tensor | list,
                   sampling_locations: Tensor, attention_weights: Tensor,
                   backend: str | None = None) -> Tensor:
    """Multi-scale deformable attention.

    value [N, S, M, D]; spatial_shapes [L, 2] (H, W) int64 (or a list of (H, W) pairs:
    levels.py); level_start_index [L] int64;
    sampling_locations [N, Lq, M, L, P, 2] (x, y) in 0..1; attention_weights [N, Lq, M, L, P]
    -> [N, Lq, M*D] in value's dtype. Bilinear sampling, zero padding, align_corners=False.

    value may be float32/float64/float16/bfloat16; sampling_locations and
    attention_weights are used in float32 (float64 with float64 value) whatever their
    dtype, accumulation is in float32 (float64), and gradients come back in each input's
    dtype. Raises ValueError for malformed inputs (see checks.py).
    """
    check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    # an exported graph may hold only standard operators (ONNX runtimes have no kernel of
    # ours): the grid_sample formulation, whatever the backend
    if torch.compiler.is_exporting() or resolve_backend(backend, value.device.type) == "torch":
        return ms_deform_attn_torch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if not torch.is_tensor(spatial_shapes):  # the kernels take the [L, 2] form
        shapes = level_shapes(spatial_shapes)
        spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
        level_start_index = torch.tensor(level_starts(shapes), dtype=torch.int64)
    return ms_deform_attn_compiled(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
