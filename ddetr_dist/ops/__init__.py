"""Multi-scale deformable attention: the compiled op, its backends and the layer."""
from .dispatch import BackendUnavailableError, ms_deform_attn, resolve_backend
from .module import MSDeformAttn
from .reference import ms_deform_attn_torch

__all__ = ["ms_deform_attn", "ms_deform_attn_torch", "MSDeformAttn", "resolve_backend",
           "BackendUnavailableError"]
