"""Gated Slot Attention (GSA) and the gated linear attention it is built from (see reference.py for the math)."""
from .chunk import chunk_gated_linear_attention, chunk_gsa
from .fused_recurrent import fused_recurrent_gsa

__all__ = ["chunk_gsa", "fused_recurrent_gsa", "chunk_gated_linear_attention"]
