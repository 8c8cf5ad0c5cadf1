"""SwiGLU's activation h = silu(g) * u over the two halves of the fused gate/up projection, fused in Triton
(fused.py) with the torch formula as oracle (reference.py).

    swiglu(gate_up)            Triton forward and backward where ``use_triton``; the torch formula elsewhere
    swiglu_reference(gate_up)  the formula in float32 (float64 for float64 inputs): the oracle and the torch path
"""
from lctrain.kernels.swiglu.fused import swiglu
from lctrain.kernels.swiglu.reference import swiglu_reference

__all__ = ["swiglu", "swiglu_reference"]
