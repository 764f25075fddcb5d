"""The compiled kernels as torch.library custom ops, so that autograd, torch.compile
(fake tensors: shapes and dtypes without running anything) and autocast all see one
opaque op per direction instead of tracing into the extension.

  ddetr::ms_deform_attn           (value, spatial_shapes, level_start_index,
                                   sampling_locations, attention_weights) -> output
  ddetr::ms_deform_attn_backward  (grad_output, <the same five>)
                                   -> (grad_value, grad_sampling_locations, grad_attention_weights)

The extension is built on first use (build.get_extension), not at import, so importing
the package costs nothing and a machine that cannot build still has the torch backend.
The kernels pick CPU or CUDA by the value's device.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import build


@torch.library.custom_op("ddetr::ms_deform_attn", mutates_args=())
def ms_deform_attn_compiled(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                            sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Output [N, Lq, M*D] in value's dtype; sampling_locations and attention_weights are
    read in float32 (float64 for float64 values) whatever their dtype."""
    return build.get_extension().forward(value, spatial_shapes, level_start_index,
                                         sampling_locations, attention_weights)


@ms_deform_attn_compiled.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    n, _, heads, channels = value.shape
    return value.new_empty((n, sampling_locations.shape[1], heads * channels))


@torch.library.custom_op("ddetr::ms_deform_attn_backward", mutates_args=())
def ms_deform_attn_compiled_backward(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
                                     level_start_index: Tensor, sampling_locations: Tensor,
                                     attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients in each input's own dtype (accumulated in float32/float64)."""
    return tuple(build.get_extension().backward(grad_output, value, spatial_shapes, level_start_index,
                                                sampling_locations, attention_weights))


@ms_deform_attn_compiled_backward.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = ms_deform_attn_compiled_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return grad_value, None, None, grad_locations, grad_weights


ms_deform_attn_compiled.register_autograd(_backward, setup_context=_setup_context)
