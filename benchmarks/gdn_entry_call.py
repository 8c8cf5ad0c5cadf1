"""The context-parallel entry call of the gated delta rule (tests/gpu/test_gated_delta_gpu.py::
test_context_parallel_entry_call) alone, forward and backward, for running under compute-sanitizer:

    compute-sanitizer --tool memcheck python3 benchmarks/gdn_entry_call.py [segment_chunks]
"""
import sys

import torch

from lctrain.kernels.gated_delta.chunk import chunk_gated_delta_rule_triton


def main() -> None:
    segment_chunks = int(sys.argv[1]) if len(sys.argv) > 1 else None
    docs = [1452, 1, 595, 2048]
    T, H, HV, K, V = sum(docs), 2, 4, 16, 24
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(1, T, H, K, device=dev, requires_grad=True)
    k = torch.nn.functional.normalize(torch.randn(1, T, H, K, device=dev), dim=-1).requires_grad_()
    v = torch.randn(1, T, HV, V, device=dev, requires_grad=True)
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, HV, device=dev) + 3).requires_grad_()
    beta = torch.rand(1, T, HV, device=dev, requires_grad=True)
    h0 = torch.randn(len(docs), HV, K, V, device=dev, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], device=dev)
    o, ht = chunk_gated_delta_rule_triton(q, k, v, g, beta, K ** -0.5, h0, True, cu, segment_chunks)
    (o.square().sum() + ht.square().sum()).backward()
    torch.cuda.synchronize()
    print("entry call ok:", segment_chunks, float(o.norm()), float(h0.grad.norm()))


if __name__ == "__main__":
    main()
