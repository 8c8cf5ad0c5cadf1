"""lctrain's token-mixer kernels, one folder per operator.

Each operator folder holds
  reference.py   the float64-capable recurrent loop: the test oracle and the spec of the op;
  chunk.py       the Triton chunkwise kernels (forward and backward) behind a torch.autograd.Function;
  fused_recurrent.py (where the op has a recurrent form) for decoding a few tokens with a carried state;
and exports the thin public functions from its __init__.

Conventions shared by every op:
  * tensors are batch-first, [B, T, H, D]; packed variable-length documents use B = 1 and ``cu_seqlens``
    (int64 offsets [N + 1]); states are float32, one per sequence: [N, H, ...] with N = B or len(cu_seqlens) - 1;
  * ``initial_state`` and ``final_state`` carry gradients both ways (context parallelism needs them);
  * on CUDA tensors, or on CPU under TRITON_INTERPRET=1, the Triton path runs; otherwise the torch path runs
    (see ``common.use_triton``).
"""
