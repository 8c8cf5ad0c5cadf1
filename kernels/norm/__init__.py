"""Normalisations over the last dimension, fused in Triton (fused.py) with torch formulas as oracle (reference.py).

    rms_norm(x, weight, eps, gate=None)   RMSNorm, optionally SiLU-gated after the norm (pre-norm blocks, q/k norms,
                                          the recurrent mixers' output norm)
    l2_norm(x, eps)                       x / sqrt(sum(x^2) + eps) (Gated DeltaNet's q and k)
"""
from lctrain.kernels.norm.fused import l2_norm, rms_norm
from lctrain.kernels.norm.reference import l2_norm_reference, rms_norm_reference

__all__ = ["rms_norm", "l2_norm", "rms_norm_reference", "l2_norm_reference"]
