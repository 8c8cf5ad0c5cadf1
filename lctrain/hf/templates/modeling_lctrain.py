"""An lctrain hybrid language model in plain PyTorch for transformers (remote code written by `lctrain convert-hf`).

Self-contained: no lctrain, no Triton. Each sublayer computes what lctrain computes (lctrain/model/*.py) for one
document per sequence, so the exported model is the trained function (`lctrain convert-hf` checks the logits):

    h_0 = Embed(ids);  h_i = h_{i-1} + Sublayer_i(RMSNorm(h_{i-1}));  logits = W_out RMSNorm(h_n)

Recurrent mixers run chunkwise over a prompt (the same recurrences, evaluated a chunk at a time); a chunk of one
token is exactly one step of the recurrence, which is how decoding proceeds. ``generate()`` keeps an LctrainCache:
per recurrent layer its state and its short-convolution tail (constant memory per token), per sliding-window layer
the last W - 1 keys and values, per full-attention layer all keys and values, per Block-State layer its SSM state,
the current block's keys and values and its context. Padded batches (an attention_mask with zeros) are refused:
the recurrences have no notion of padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_lctrain import LctrainConfig

CHUNK = 64  # tokens per chunk of the chunkwise recurrences
QUERY_BLOCK = 1024  # queries per attention call: a mask of QUERY_BLOCK x visible keys, never T x T


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, in float32."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """RMSNorm(x) * silu(gate) over one head's channels (norm before gate)."""

    def forward(self, x, gate):
        normed = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return (normed * F.silu(gate.float())).to(x.dtype)


class ShortConv(nn.Module):
    """y_t = silu(sum_j w_j x_{t-(K-1)+j}), a causal depthwise convolution; its state is the last K - 1 inputs."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.zeros(channels, kernel_size))

    def forward(self, x, tail):
        width, length = self.kernel_size - 1, x.shape[1]
        if tail is None:
            tail = x.new_zeros(x.shape[0], width, x.shape[2])
        extended = torch.cat([tail, x], 1)
        y = x * self.weight[:, width].to(x.dtype)
        for j in range(width):
            y = y + extended[:, j:j + length] * self.weight[:, j].to(x.dtype)
        return F.silu(y), extended[:, extended.shape[1] - width:]


def l2_normalize(x, eps: float = 1e-6):
    return x * torch.rsqrt((x.float() * x.float()).sum(-1, keepdim=True) + eps).to(x.dtype)


def _decays(gates):
    """Cumulative log decays G [B, C, H, *] inside a chunk and exp(G_t - G_s) for s <= t (0 above): [B, t, s, H, *]."""
    cumulative = gates.cumsum(1)
    length = gates.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=gates.device).tril()
    causal = causal.view(1, length, length, *([1] * (gates.dim() - 2)))
    pairwise = cumulative[:, :, None] - cumulative[:, None, :]
    return cumulative, torch.where(causal, pairwise, float("-inf")).exp()


def gated_linear_attention(q, k, v, g, state, gate_on: str):
    """Gated linear attention with unit scale (lctrain's GSA passes and Mamba2's SSD), chunk by chunk:

        key side    S_t = diag(exp g_t) S_{t-1} + k_t v_t^T      g_t over the K key channels
        value side  S_t = S_{t-1} diag(exp g_t) + k_t v_t^T      g_t over the V value channels
        o_t = S_t^T q_t

    q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K or V] (log space, <= 0); state [B, H, K, V] float32 or None.
    Returns o [B, T, H, V] float32 and the final state.
    """
    batch, length, heads, key_dim = q.shape
    q, k, v, g = q.float(), k.float(), v.float(), g.float()
    S = q.new_zeros(batch, heads, key_dim, v.shape[-1]) if state is None else state
    outputs = []
    for start in range(0, length, CHUNK):
        qc, kc, vc, gc = (t[:, start:start + CHUNK] for t in (q, k, v, g))
        G, decay = _decays(gc)
        last = G[:, -1]
        if gate_on == "key":
            scores = torch.einsum("bthk,bshk,btshk->bhts", qc, kc, decay)
            o = torch.einsum("bhts,bshv->bthv", scores, vc) + torch.einsum("bthk,bhkv->bthv", qc * G.exp(), S)
            S = S * last.exp()[..., None] + torch.einsum("bshk,bshv->bhkv", kc * (last[:, None] - G).exp(), vc)
        else:
            scores = torch.einsum("bthk,bshk->bhts", qc, kc)
            o = torch.einsum("bhts,bshv,btshv->bthv", scores, vc, decay) + torch.einsum("bthk,bhkv->bthv", qc, S) * G.exp()
            S = S * last.exp()[:, :, None, :] + torch.einsum("bshk,bshv->bhkv", kc, vc * (last[:, None] - G).exp())
        outputs.append(o)
    return torch.cat(outputs, 1), S


def gated_delta_rule(q, k, v, g, beta, state):
    """The gated delta rule, chunk by chunk (per value head, scale K^-1/2):

        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t / sqrt(K)

    Inside a chunk from S_0, with G_t the cumulative log decay: S_t = e^{G_t} S_0 + sum_{s<=t} e^{G_t - G_s} k_s n_s^T
    where (I + L) n = beta v - beta e^{G} K S_0, L[t, s] = beta_t e^{G_t - G_s} k_t.k_s (s < t): two triangular solves.
    q, k [B, T, HV, K] (key heads repeated to value heads); v [B, T, HV, V]; g, beta [B, T, HV]; state float32.
    """
    batch, length, heads, key_dim = q.shape
    q = q.float() * key_dim ** -0.5
    k, v, g, beta = k.float(), v.float(), g.float(), beta.float()
    S = q.new_zeros(batch, heads, key_dim, v.shape[-1]) if state is None else state
    outputs = []
    for start in range(0, length, CHUNK):
        qc, kc, vc, gc, bc = (t[:, start:start + CHUNK].transpose(1, 2) for t in (q, k, v, g, beta))  # [B, H, C, .]
        G = gc.cumsum(-1)
        size = gc.shape[-1]
        causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
        decay = torch.where(causal, G[..., :, None] - G[..., None, :], float("-inf")).exp()  # [B, H, t, s]
        lower = (bc[..., None] * (kc @ kc.transpose(-1, -2)) * decay).tril(-1)
        system = lower + torch.eye(size, device=q.device)
        u = torch.linalg.solve_triangular(system, vc * bc[..., None], upper=False, unitriangular=True)
        w = torch.linalg.solve_triangular(system, kc * (bc * G.exp())[..., None], upper=False, unitriangular=True)
        new = u - w @ S
        o = (qc * G.exp()[..., None]) @ S + ((qc @ kc.transpose(-1, -2)) * decay) @ new
        S = S * G[..., -1:, None].exp() + (kc * (G[..., -1:] - G).exp()[..., None]).transpose(-1, -2) @ new
        outputs.append(o.transpose(1, 2))
    return torch.cat(outputs, 1), S


def rotary(x, positions, rot_dim: int, theta: float):
    """RoPE on the first rot_dim channels of x [B, T, H, D] at positions [T] (rotate-half convention)."""
    if rot_dim == 0:
        return x
    inv_freq = 1.0 / theta ** (torch.arange(0, rot_dim, 2, device=x.device, dtype=torch.float32) / rot_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    cos = torch.cat([angles.cos(), angles.cos()], -1)[..., None, :]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[..., None, :]
    x_rot, x_pass = x[..., :rot_dim].float(), x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], -1)
    return torch.cat([(x_rot * cos + rotated * sin).to(x.dtype), x_pass], -1)


# ---------------------------------------------------------------------------------------------------------------
# Mixers: forward(x [B, T, D], state or None, start = position of x's first token) -> (y [B, T, D], new state)
# ---------------------------------------------------------------------------------------------------------------
class GatedDeltaNet(nn.Module):
    """G: q, k, v through causal convs + SiLU, L2-normed q and k, beta = sigmoid(b), g = -exp(A_log) softplus(a +
    dt_bias), the gated delta rule, RMSNorm(o) * SiLU(z), output projection (Qwen3-Next's parameterisation)."""

    def __init__(self, config):
        super().__init__()
        c, hidden = config.gated_deltanet, config.hidden_size
        self.heads, self.value_heads = c["num_heads"], c["num_value_heads"]
        self.key_dim, self.value_dim = c["head_k_dim"], c["head_v_dim"]
        qk, vz = self.heads * self.key_dim, self.value_heads * self.value_dim
        self.qk_proj = nn.Linear(hidden, 2 * qk, bias=False)
        self.vz_proj = nn.Linear(hidden, 2 * vz, bias=False)
        self.ba_proj = nn.Linear(hidden, 2 * self.value_heads, bias=False)
        self.q_conv, self.k_conv = ShortConv(qk, c["conv_size"]), ShortConv(qk, c["conv_size"])
        self.v_conv = ShortConv(vz, c["conv_size"])
        self.A_log = nn.Parameter(torch.zeros(self.value_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.value_heads))
        self.out_norm = GatedRMSNorm(self.value_dim, config.norm_eps)
        self.out_proj = nn.Linear(vz, hidden, bias=False)

    def forward(self, x, state, start):
        batch, length, _ = x.shape
        state = state or {}
        q, k = self.qk_proj(x).chunk(2, dim=-1)
        v, z = self.vz_proj(x).chunk(2, dim=-1)
        b, a = self.ba_proj(x).chunk(2, dim=-1)
        q, q_tail = self.q_conv(q, state.get("q_tail"))
        k, k_tail = self.k_conv(k, state.get("k_tail"))
        v, v_tail = self.v_conv(v, state.get("v_tail"))
        group = self.value_heads // self.heads
        q = l2_normalize(q.view(batch, length, self.heads, self.key_dim)).repeat_interleave(group, dim=2)
        k = l2_normalize(k.view(batch, length, self.heads, self.key_dim)).repeat_interleave(group, dim=2)
        v = v.view(batch, length, self.value_heads, self.value_dim)
        beta = torch.sigmoid(b.float())
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        o, S = gated_delta_rule(q, k, v, g, beta, state.get("S"))
        o = self.out_norm(o.to(x.dtype), z.view(batch, length, self.value_heads, self.value_dim))
        return self.out_proj(o.reshape(batch, length, -1)), {"S": S, "q_tail": q_tail, "k_tail": k_tail, "v_tail": v_tail}


class GatedSlotAttention(nn.Module):
    """S: f = logsigmoid(W_f x) / tau, s = 1 - exp(f); slot scores from Hk (value-side gates), a softmax over the M
    slots, the read from Hv (key-side gates); RMSNorm(SiLU(o)) per head, output projection."""

    def __init__(self, config):
        super().__init__()
        c, hidden = config.gated_slot_attention, config.hidden_size
        self.heads, self.slots = c["num_heads"], c["num_slots"]
        self.key_dim, self.value_dim = c["head_k_dim"], c["head_v_dim"]
        self.gate_normalizer, self.eps = c["gate_normalizer"], config.norm_eps
        self.qk_proj = nn.Linear(hidden, 2 * self.heads * self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.heads * self.value_dim, bias=False)
        self.f_proj = nn.Linear(hidden, self.heads * self.slots, bias=False)
        self.out_norm_weight = nn.Parameter(torch.ones(self.heads * self.value_dim))
        self.out_proj = nn.Linear(self.heads * self.value_dim, hidden, bias=False)

    def forward(self, x, state, start):
        batch, length, _ = x.shape
        state = state or {}
        q, k = F.silu(self.qk_proj(x)).chunk(2, dim=-1)
        v = F.silu(self.v_proj(x))
        f = F.logsigmoid(self.f_proj(x).float()) / self.gate_normalizer
        s = (1 - f.exp()).to(x.dtype)
        heads = lambda t, d: t.reshape(batch, length, self.heads, d)  # noqa: E731
        f, s = heads(f, self.slots), heads(s, self.slots)
        scores, hk = gated_linear_attention(heads(q, self.key_dim), heads(k, self.key_dim), s, f, state.get("hk"), "value")
        p = torch.softmax(scores, dim=-1).to(x.dtype)
        o, hv = gated_linear_attention(p, s, heads(v, self.value_dim), f, state.get("hv"), "key")
        o = F.silu(o)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)
        o = o.reshape(batch, length, -1) * self.out_norm_weight.float()
        return self.out_proj(o.to(x.dtype)), {"hk": hk, "hv": hv}


class Mamba2(nn.Module):
    """M: SSD with a scalar decay per head, dt = softplus(W_dt x + dt_bias), S_t = exp(dt A) S_{t-1} + dt B x^T,
    y = C^T S + D x; x, B, C through causal convs + SiLU; RMSNorm(y * SiLU(z)) per group, output projection."""

    def __init__(self, config):
        super().__init__()
        c, hidden = config.mamba2, config.hidden_size
        self.heads, self.head_dim, self.state_size, self.groups = c["num_heads"], c["head_dim"], c["state_size"], c["num_groups"]
        inner, bc = self.heads * self.head_dim, self.groups * self.state_size
        self.eps = config.norm_eps
        self.zx_proj = nn.Linear(hidden, 2 * inner, bias=False)
        self.bc_proj = nn.Linear(hidden, 2 * bc, bias=False)
        self.dt_proj = nn.Linear(hidden, self.heads, bias=False)
        self.x_conv, self.b_conv, self.c_conv = (ShortConv(n, c["conv_size"]) for n in (inner, bc, bc))
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.heads))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm_weight = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x, state, start):
        batch, length, _ = x.shape
        state = state or {}
        per_group = self.heads // self.groups
        z, xs = self.zx_proj(x).chunk(2, dim=-1)
        b, c = self.bc_proj(x).chunk(2, dim=-1)
        xs, x_tail = self.x_conv(xs, state.get("x_tail"))
        b, b_tail = self.b_conv(b, state.get("b_tail"))
        c, c_tail = self.c_conv(c, state.get("c_tail"))
        xs = xs.view(batch, length, self.heads, self.head_dim)
        b = b.view(batch, length, self.groups, self.state_size).repeat_interleave(per_group, dim=2)
        c = c.view(batch, length, self.groups, self.state_size).repeat_interleave(per_group, dim=2)
        dt = F.softplus(self.dt_proj(x).float() + self.dt_bias.float())
        g = (dt * -self.A_log.float().exp())[..., None].expand(-1, -1, -1, self.state_size)
        y, S = gated_linear_attention(c, (b * dt[..., None]).to(x.dtype), xs, g, state.get("S"), "key")
        y = y + self.D.float()[:, None] * xs.float()
        y = (y.reshape(batch, length, -1) * F.silu(z.float())).view(batch, length, self.groups, -1)
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).reshape(batch, length, -1)
        out = self.out_proj((y * self.norm_weight.float()).to(x.dtype))
        return out, {"S": S, "x_tail": x_tail, "b_tail": b_tail, "c_tail": c_tail}


class Attention(nn.Module):
    """* and W: grouped-query softmax attention with RoPE (optionally qk RMSNorm and an output gate); a token sees
    itself and the W - 1 before it under a window, every earlier token without."""

    def __init__(self, config, sliding_window: bool):
        super().__init__()
        a, hidden = config.attention, config.hidden_size
        self.heads, self.kv_heads, self.head_dim = a["num_heads"], a["num_kv_heads"], a["head_dim"]
        self.rot_dim, self.theta = a["rotary_dim"], a["rope_theta"]
        self.qk_norm, self.output_gate = a["qk_norm"], a["output_gate"]
        self.window = a["window"] if sliding_window else None
        d = self.head_dim
        self.q_proj = nn.Linear(hidden, (2 if self.output_gate else 1) * self.heads * d, bias=False)
        self.kv_proj = nn.Linear(hidden, 2 * self.kv_heads * d, bias=False)
        self.out_proj = nn.Linear(self.heads * d, hidden, bias=False)
        if self.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(d, config.norm_eps), RMSNorm(d, config.norm_eps)

    def forward(self, x, state, start):
        batch, length, _ = x.shape
        heads = lambda t, n: t.reshape(batch, length, n, self.head_dim)  # noqa: E731
        q = self.q_proj(x)  # [q; output gate] of all heads
        if self.output_gate:
            q, gate = q.chunk(2, dim=-1)
            gate = heads(gate, self.heads)
        q = heads(q, self.heads)
        k, v = (heads(t, self.kv_heads) for t in self.kv_proj(x).chunk(2, dim=-1))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        positions = torch.arange(start, start + length, device=x.device)
        q, k = rotary(q, positions, self.rot_dim, self.theta), rotary(k, positions, self.rot_dim, self.theta)
        if state is not None:
            k, v = torch.cat([state["k"], k], 1), torch.cat([state["v"], v], 1)
        first = start + length - k.shape[1]  # position of the first key held
        o = torch.empty_like(q)
        for s in range(0, length, QUERY_BLOCK):
            e = min(s + QUERY_BLOCK, length)
            lo = 0 if self.window is None else max(0, start + s - (self.window - 1) - first)
            hi = start + e - first  # the block's queries see keys up to the last of them
            key_positions = torch.arange(first + lo, first + hi, device=x.device)
            visible = key_positions[None, :] <= positions[s:e, None]
            if self.window is not None:
                visible &= positions[s:e, None] - key_positions[None, :] < self.window
            o[:, s:e] = F.scaled_dot_product_attention(
                q[:, s:e].transpose(1, 2), k[:, lo:hi].transpose(1, 2), v[:, lo:hi].transpose(1, 2), attn_mask=visible,
                scale=self.head_dim ** -0.5, enable_gqa=self.heads != self.kv_heads).transpose(1, 2)
        if self.output_gate:
            o = o * torch.sigmoid(gate)
        if self.window is not None:
            k, v = k[:, k.shape[1] - min(k.shape[1], self.window - 1):], v[:, v.shape[1] - min(v.shape[1], self.window - 1):]
        return self.out_proj(o.reshape(batch, length, -1)), {"k": k, "v": v}


def s4d(u, log_dt, A_real_log, A_imag, B, C, D, x0, block: int = 256):
    """The S4D SSM x_t = Abar x_{t-1} + Bbar u_t, y_t = Re(C x_t) + D u_t over u [batch, T, H] from x0 [batch, H, N]
    (complex128, None: zero), with ZOH Abar = exp(dt A), Bbar = (Abar - 1) / A B, dt = exp(log_dt),
    A = -exp(A_real_log) + i A_imag. Evaluated as y = k * u (causal convolution by FFT, k[s] = Re(sum_n C Bbar
    Abar^s)) + Re(C Abar^{t+1} x0) + D u, in float64; returns y (u's dtype) and the final state."""
    batch, length, _ = u.shape
    dtA = torch.exp(log_dt.double())[:, None] * torch.complex(-torch.exp(A_real_log.double()), A_imag.double())
    Bbar = torch.expm1(dtA) / torch.complex(-torch.exp(A_real_log.double()), A_imag.double()) * torch.complex(B[..., 0].double(), B[..., 1].double())
    Cc = torch.complex(C[..., 0].double(), C[..., 1].double())
    ud = u.double()

    def powers(steps):  # Abar^steps: [H, N, len(steps)]
        return torch.exp(dtA[..., None] * steps.to(torch.float64))

    spans = [torch.arange(s, min(s + block, length), device=u.device) for s in range(0, length, block)]
    kernel = torch.cat([((Cc * Bbar)[..., None] * powers(s)).sum(1).real for s in spans], -1)  # [H, T]
    n = 2 * length
    y = torch.fft.irfft(torch.fft.rfft(ud, n, dim=1) * torch.fft.rfft(kernel.t(), n, dim=0), n, dim=1)[:, :length]
    final = torch.zeros(batch, *dtA.shape, dtype=torch.complex128, device=u.device)
    for s in spans:  # x_{T-1} gains Abar^{T-1-t} Bbar u_t
        final = final + torch.einsum("hns,bsh->bhn", powers(length - 1 - s) * Bbar[..., None], ud[:, s].to(torch.complex128))
    if x0 is not None:
        entry = torch.cat([torch.einsum("hns,bhn->bsh", Cc[..., None] * powers(s + 1), x0).real for s in spans], 1)
        y = y + entry
        final = final + powers(torch.tensor([length], device=u.device))[..., 0] * x0
    y = y + D.double() * ud
    return y.to(u.dtype), final


class BlockState(nn.Module):
    """B: an S4D SSM over the whole sequence gives context vectors c; the sequence is cut into blocks of W tokens,
    each token attends causally inside its block and to S context states of everything before the block; the
    two outputs are concatenated and projected. Context states of the block starting at s: single_head the last S
    vectors c[s-S:s]; multi_head S states projected from c[s-1]; multi_filter c[s-1] of S SSM filters."""

    def __init__(self, config):
        super().__init__()
        c, hidden = config.block_state, config.hidden_size
        self.variant, self.block, self.num_states = c["variant"], c["block_size"], c["num_context_states"]
        self.heads, self.head_dim = c["num_heads"], hidden // c["num_heads"]
        self.filters = self.num_states if self.variant == "multi_filter" else 1
        channels, modes = hidden * self.filters, c["ssm_state_size"]
        self.log_dt = nn.Parameter(torch.zeros(channels))
        self.A_real_log = nn.Parameter(torch.zeros(channels, modes))
        self.A_imag = nn.Parameter(torch.zeros(channels, modes))
        self.B = nn.Parameter(torch.zeros(channels, modes, 2))
        self.C = nn.Parameter(torch.zeros(channels, modes, 2))
        self.skip = nn.Parameter(torch.ones(channels))
        if self.variant == "multi_head":
            self.context_proj = nn.Parameter(torch.zeros(self.num_states * hidden, hidden))
        self.qkv_proj = nn.Linear(hidden, 3 * hidden, bias=False)
        self.context_kv_proj = nn.Linear(hidden, 2 * hidden, bias=False)
        self.out_proj = nn.Linear(2 * hidden, hidden, bias=False)

    def context(self, c_ext, index):
        """Keys and values of the context states of the block whose first token is c_ext[:, index]."""
        batch, _, _, hidden = c_ext.shape
        if self.variant == "single_head":
            states = c_ext[:, index - self.num_states:index, 0]
        elif self.variant == "multi_filter":
            states = c_ext[:, index - 1]
        else:
            states = (c_ext[:, index - 1, 0] @ self.context_proj.t().to(c_ext.dtype)).view(batch, self.num_states, hidden)
        return [t.reshape(batch, self.num_states, self.heads, self.head_dim)
                for t in self.context_kv_proj(states).chunk(2, dim=-1)]

    def forward(self, x, state, start):
        batch, length, hidden = x.shape
        h, hd, w = self.heads, self.head_dim, self.block
        tail = self.num_states if self.variant == "single_head" else 1
        state = state or {"c_tail": x.new_zeros(batch, tail, self.filters, hidden), "kv": None, "context": None}
        u = x.repeat(1, 1, self.filters) if self.filters > 1 else x
        c, ssm = s4d(u, self.log_dt, self.A_real_log, self.A_imag, self.B, self.C, self.skip, state.get("ssm"))
        c_ext = torch.cat([state["c_tail"], c.view(batch, length, self.filters, hidden)], 1)
        q, k, v = (t.reshape(batch, length, h, hd) for t in self.qkv_proj(x).chunk(3, dim=-1))
        kv, context, outputs, t = state["kv"], state["context"], [], 0
        while t < length:
            position = start + t
            if position % w == 0:  # a block starts: no keys yet; its context summarises everything before it
                kv = None
                context = None if position == 0 else self.context(c_ext, t + tail)
            size = min(length - t, w - position % w)
            qs, ks, vs = q[:, t:t + size], k[:, t:t + size], v[:, t:t + size]
            if kv is not None:
                ks, vs = torch.cat([kv[0], ks], 1), torch.cat([kv[1], vs], 1)
            kv = (ks, vs)
            causal = torch.ones(size, ks.shape[1], dtype=torch.bool, device=x.device).tril(ks.shape[1] - size)
            own = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), attn_mask=causal)
            own = own.transpose(1, 2).reshape(batch, size, h * hd)
            if context is None:  # the first block has nothing before it: no cross-attention output
                cross = own.new_zeros(batch, size, h * hd)
            else:
                scores = torch.einsum("bwhd,bshd->bhws", qs.float(), context[0].float()) * hd ** -0.5
                cross = torch.einsum("bhws,bshd->bwhd", torch.softmax(scores, -1), context[1].float())
                cross = cross.to(x.dtype).reshape(batch, size, h * hd)
            outputs.append(torch.cat([own, cross], -1))
            t += size
        new_state = {"ssm": ssm, "c_tail": c_ext[:, c_ext.shape[1] - tail:], "kv": kv, "context": context}
        return self.out_proj(torch.cat(outputs, 1)), new_state


class SwiGLU(nn.Module):
    """-: down(silu(gate(x)) * up(x)), gate and up in one matmul."""

    def __init__(self, config):
        super().__init__()
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.down = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x, state, start):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up), None


MIXERS = {
    "G": GatedDeltaNet, "S": GatedSlotAttention, "M": Mamba2, "B": BlockState,
    "*": lambda config: Attention(config, sliding_window=False), "W": lambda config: Attention(config, sliding_window=True),
    "-": SwiGLU,
}


class Sublayer(nn.Module):
    """x + mixer(RMSNorm(x))."""

    def __init__(self, config, symbol: str):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mixer = MIXERS[symbol](config)

    def forward(self, x, state, start):
        y, state = self.mixer(self.norm(x), state, start)
        return x + y, state


# ---------------------------------------------------------------------------------------------------------------
# Cache and models
# ---------------------------------------------------------------------------------------------------------------
class LctrainCache:
    """Decoding state of every sublayer (dicts of tensors, batch first) and the number of tokens seen."""

    is_compileable = False
    is_croppable = False

    def __init__(self):
        self.states: dict[int, dict | None] = {}
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx):
        def pick(value):
            if isinstance(value, torch.Tensor):
                return value.index_select(0, beam_idx.to(value.device))
            if isinstance(value, (tuple, list)):
                return type(value)(pick(v) for v in value)
            if isinstance(value, dict):
                return {key: pick(v) for key, v in value.items()}
            return value

        self.states = pick(self.states)


class LctrainPreTrainedModel(PreTrainedModel):
    config_class = LctrainConfig
    base_model_prefix = "model"
    _no_split_modules = ["Sublayer"]
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
        """Only for weights missing from a checkpoint (an exported folder holds all of them)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, 0.02)


class LctrainModel(LctrainPreTrainedModel):
    def __init__(self, config: LctrainConfig):
        super().__init__(config)
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Sublayer(config, symbol) for symbol in config.pattern)
        self.final_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding

    def set_input_embeddings(self, value):
        self.embedding = value

    def forward(self, input_ids=None, inputs_embeds=None, past_key_values: LctrainCache | None = None):
        h = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        start = 0 if past_key_values is None else past_key_values.seen
        for i, layer in enumerate(self.layers):
            state = None if past_key_values is None else past_key_values.states.get(i)
            h, state = layer(h, state, start)
            if past_key_values is not None:
                past_key_values.states[i] = state
        if past_key_values is not None:
            past_key_values.seen += h.shape[1]
        return self.final_norm(h)


class LctrainForCausalLM(LctrainPreTrainedModel, GenerationMixin):
    def __init__(self, config: LctrainConfig):
        super().__init__(config)
        self.model = LctrainModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model keeps its own LctrainCache

    def get_input_embeddings(self):
        return self.model.embedding

    def get_output_embeddings(self):
        return None if self.config.tie_word_embeddings else self.lm_head

    def output_weight(self):
        return self.model.embedding.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, use_cache=True,
                                      logits_to_keep=0, **kwargs):
        """With a cache only the tokens it has not seen go in (the prompt first, then one token at a time)."""
        if use_cache:
            past_key_values = past_key_values if isinstance(past_key_values, LctrainCache) else LctrainCache()
            input_ids = input_ids[:, past_key_values.seen:]
        else:
            past_key_values = None
        return {"input_ids": input_ids, "past_key_values": past_key_values, "use_cache": use_cache,
                "attention_mask": attention_mask, "logits_to_keep": logits_to_keep}

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep=0, return_dict=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("this lctrain model does not take padded batches (an attention_mask with zeros): its "
                             "recurrent layers have no notion of padding; give sequences of equal length")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and not isinstance(past_key_values, LctrainCache):
            past_key_values = LctrainCache()
        hidden = self.model(input_ids, inputs_embeds, past_key_values if use_cache else None)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = (hidden @ self.output_weight().t().to(hidden.dtype)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)

