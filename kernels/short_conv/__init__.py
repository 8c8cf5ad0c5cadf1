"""Short causal depthwise convolution (+ SiLU) with document resets and a context-parallel halo: the kernel-4 conv
before Gated DeltaNet's and Mamba2's mixers.

    causal_short_conv            Triton forward and backward (conv.py); the torch shifted sum elsewhere
    causal_short_conv_reference  the sum over taps: the oracle and the torch path (reference.py)
"""
from lctrain.kernels.short_conv.conv import causal_short_conv
from lctrain.kernels.short_conv.reference import causal_short_conv_reference

__all__ = ["causal_short_conv", "causal_short_conv_reference"]
