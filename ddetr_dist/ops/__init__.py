"""Multi-scale deformable attention: the compiled op, its backends and the layer."""
from .dispatch import ms_deform_attn
from .module import MSDeformAttn
from .reference import ms_deform_attn_torch

__all__ = ["ms_deform_attn", "ms_deform_attn_torch", "MSDeformAttn"]
