"""The context-parallel entry call of the gated delta rule (tests/gpu/test_gated_delta_gpu.py::
test_context_parallel_entry_call) alone, forward and backward, for running under compute-sanitizer:

    compute-sanitizer --tool memcheck python3 benchmarks/gdn_entry_call.py [--dtype float32] [--K 16] [--V 24]
        [--segment-chunks N]
"""
import argparse

import torch

from lctrain.kernels.gated_delta import chunk as gdn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--K", type=int, default=16)
    parser.add_argument("--V", type=int, default=24)
    parser.add_argument("--segment-chunks", type=int)
    args = parser.parse_args()
    docs = [1452, 1, 595, 2048]
    T, H, HV, K, V = sum(docs), 2, 4, args.K, args.V
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    dev = "cuda"

    def leaf(x):
        return x.to(dtype).requires_grad_()
    q = leaf(torch.randn(1, T, H, K, device=dev))
    k = leaf(torch.nn.functional.normalize(torch.randn(1, T, H, K, device=dev), dim=-1))
    v = leaf(torch.randn(1, T, HV, V, device=dev))
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, HV, device=dev) + 3).requires_grad_()
    beta = leaf(torch.rand(1, T, HV, device=dev))
    h0 = torch.randn(len(docs), HV, K, V, device=dev, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], device=dev)
    o, ht = gdn.chunk_gated_delta_rule_triton(q, k, v, g, beta, K ** -0.5, h0, True, cu, args.segment_chunks)
    (o.float().square().sum() + ht.square().sum()).backward()
    torch.cuda.synchronize()
    print("entry call ok:", vars(args), float(o.float().norm()), float(h0.grad.norm()), flush=True)


if __name__ == "__main__":
    main()
