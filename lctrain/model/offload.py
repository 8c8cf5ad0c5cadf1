"""Block activation checkpointing with the saved sublayer inputs in host memory
(``train.activation_checkpointing: block_offload``), used by lctrain.model.hybrid."""
from __future__ import annotations

import torch


class HostOffloadedSublayer(torch.autograd.Function):
    """A sublayer under block checkpointing whose input waits in pinned host memory between forward and backward
    (``train.activation_checkpointing: block_offload``). Block checkpointing keeps one [L, D] input per sublayer on
    the GPU, at the longest lengths most of a step's memory (4 KiB per token and sublayer at D = 2048, bf16); here
    the forward saves nothing on the GPU and copies the input out on a side stream (overlapping the next sublayer);
    the backward recomputes the sublayer from the input copied back and takes its gradients. Copies back run on the
    side stream one sublayer ahead: each backward first starts fetching the previous sublayer's input (``chain``:
    this forward's sublayers in order), so the copy overlaps its own recompute and gradients. The parameters are
    inputs of the function, so their gradients accumulate through autograd as usual (DeepSpeed's hooks see them).
    Off a GPU the input is kept as it is (nothing to offload to)."""

    @staticmethod
    def forward(ctx, x, layer, layout, chain, *params):
        ctx.layer, ctx.layout, ctx.device = layer, layout, x.device
        ctx.chain, ctx.index, ctx.fetched = chain, len(chain), None
        chain.append(ctx)
        if x.device.type == "cuda":
            ctx.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            stream = _copy_stream(x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                ctx.host.copy_(x, non_blocking=True)
            x.record_stream(stream)  # its memory is reused only after the copy
            ctx.copied = stream.record_event()
        else:
            ctx.host = x.detach()
        with torch.no_grad():
            return layer(x, layout)

    @staticmethod
    def _fetch(ctx) -> None:
        """Start copying ctx's input back to the device (on the side stream, after its copy out)."""
        if ctx.device.type != "cuda":
            ctx.fetched = (ctx.host, None)
        else:
            stream = _copy_stream(ctx.device)
            stream.wait_event(ctx.copied)
            with torch.cuda.stream(stream):
                x = ctx.host.to(ctx.device, non_blocking=True)
            ctx.fetched = (x, stream.record_event())
        del ctx.host

    @staticmethod
    def backward(ctx, grad):
        if ctx.fetched is None:
            HostOffloadedSublayer._fetch(ctx)
        if ctx.index > 0:
            HostOffloadedSublayer._fetch(ctx.chain[ctx.index - 1])
        ctx.chain[ctx.index] = None  # the chain no longer holds this sublayer
        x, ready = ctx.fetched
        ctx.fetched = None
        if ready is not None:
            current = torch.cuda.current_stream(ctx.device)
            current.wait_event(ready)
            x.record_stream(current)  # allocated on the side stream, used (and freed) here
        x = x.detach().requires_grad_()
        params = trainable_parameters(ctx.layer)
        with torch.enable_grad():
            out = ctx.layer(x, ctx.layout)
        grads = torch.autograd.grad(out, [x, *params], grad, allow_unused=True)
        return grads[0], None, None, None, *grads[1:]


_COPY_STREAMS: dict = {}


def _copy_stream(device: torch.device):
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


def trainable_parameters(layer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in layer.parameters() if p.requires_grad]
