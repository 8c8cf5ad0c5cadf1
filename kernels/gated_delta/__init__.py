"""Gated DeltaNet's token mixer, the gated delta rule (Yang, Kautz & Hatamizadeh, "Gated Delta Networks").

    chunk_gated_delta_rule            training and prefill: Triton chunkwise kernels (chunk.py)
    fused_recurrent_gated_delta_rule  decoding a few tokens with a carried state (fused_recurrent.py)
    gated_delta_rule_reference        the token-by-token oracle (reference.py)
"""
from lctrain.kernels.gated_delta.chunk import chunk_gated_delta_rule
from lctrain.kernels.gated_delta.fused_recurrent import fused_recurrent_gated_delta_rule
from lctrain.kernels.gated_delta.reference import gated_delta_rule_reference

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "gated_delta_rule_reference"]
