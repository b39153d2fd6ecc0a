"""An independent reference: one attention layer with a prefix, written from the formulas.

    h = Attention(Q, [P_k; K], [P_v; V]),  P_k = P_theta W_k (+ b_k),  P_v = P_theta W_v (+ b_v)

It reads only raw weight tensors (never calls the model's modules nor server.models) and does its
own projections, Qwen3 RMS norms, rotary embedding (text positions P, P+1, ...; prefix keys get
none), grouped-query head repeat, scaling, causal mask and softmax.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

# Where each family keeps its layers' self-attention: (base model, layers, attention).
ATTENTION_PATH = {
    "gpt2": ("transformer", "h", "attn"),
    "llama": ("model", "layers", "self_attn"),
    "qwen2": ("model", "layers", "self_attn"),
    "qwen3": ("model", "layers", "self_attn"),
    "gpt_neox": ("gpt_neox", "layers", "attention"),
}


def attention_modules(family: str, model: PreTrainedModel) -> list[nn.Module]:
    base, layers, attn = ATTENTION_PATH[family]
    return [getattr(layer, attn) for layer in getattr(getattr(model, base), layers)]


def _shapes(config: PretrainedConfig) -> tuple[int, int, int]:
    """(query heads, kv heads, head_dim) straight from the config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _split_heads(x: Tensor, head_dim: int) -> Tensor:
    return x.reshape(x.shape[0], -1, head_dim).transpose(0, 1)  # [S, H*hd] -> [H, S, hd]


def project_qkv(
    family: str, attn: nn.Module, config: PretrainedConfig, x: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Own projections of rows x [S, d]: q [H, S, hd], k and v [H_kv, S, hd] (no rotary)."""
    _, _, hd = _shapes(config)
    d = config.hidden_size
    if family == "gpt2":  # Conv1D stores weight as [in, out]; output is [q | k | v]
        qkv = x @ attn.c_attn.weight + attn.c_attn.bias
        return tuple(_split_heads(t, hd) for t in qkv.split(d, dim=-1))  # type: ignore[return-value]
    if family == "gpt_neox":  # Linear output laid out per head as [H, (q, k, v), hd]
        qkv = (x @ attn.query_key_value.weight.T + attn.query_key_value.bias).view(
            len(x), -1, 3, hd
        )
        return tuple(qkv[:, :, i].transpose(0, 1) for i in range(3))  # type: ignore[return-value]
    q, k, v = (_split_heads(_linear(x, getattr(attn, f"{n}_proj")), hd) for n in ("q", "k", "v"))
    if family == "qwen3":  # per-head RMS norm of queries and keys
        q = _rms_norm(q, attn.q_norm.weight, config.rms_norm_eps)
        k = _rms_norm(k, attn.k_norm.weight, config.rms_norm_eps)
    return q, k, v


def _linear(x: Tensor, layer: nn.Module) -> Tensor:
    out = x @ layer.weight.T
    return out if layer.bias is None else out + layer.bias


def _rotary(family: str, config: PretrainedConfig, x: Tensor, positions: Tensor) -> Tensor:
    """Rotate-half RoPE on the first `rotary_dims` of each head of x [H, S, hd]."""
    if family == "gpt2":  # learned absolute positions, added to the input embeddings instead
        return x
    rope = config.rope_parameters
    dims = int(x.shape[-1] * rope.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / rope["rope_theta"] ** (torch.arange(0, dims, 2, dtype=torch.float64) / dims)
    angles = positions.double()[:, None] * inv_freq[None]  # [S, dims / 2]
    cos = torch.cat([angles, angles], -1).cos().to(x.dtype)
    sin = torch.cat([angles, angles], -1).sin().to(x.dtype)
    rot, rest = x[..., :dims], x[..., dims:]
    half = dims // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


def _output_projection(family: str, attn: nn.Module, x: Tensor) -> Tensor:
    if family == "gpt2":
        return x @ attn.c_proj.weight + attn.c_proj.bias
    return _linear(x, attn.dense if family == "gpt_neox" else attn.o_proj)


def prefix_attention(
    family: str, attn: nn.Module, config: PretrainedConfig, h: Tensor, p_rows: Tensor
) -> Tensor:
    """Attention output [S, d] for text hidden states h [S, d] after prefix rows p_rows [T, d]."""
    heads, kv_heads, hd = _shapes(config)
    prefix_len, seq = len(p_rows), len(h)
    q, k, v = project_qkv(family, attn, config, h)
    _, p_k, p_v = project_qkv(family, attn, config, p_rows)
    positions = torch.arange(prefix_len, prefix_len + seq)
    q, k = _rotary(family, config, q, positions), _rotary(family, config, k, positions)
    keys = torch.cat([p_k, k], dim=1).repeat_interleave(heads // kv_heads, dim=0)  # [H, T+S, hd]
    values = torch.cat([p_v, v], dim=1).repeat_interleave(heads // kv_heads, dim=0)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(hd)  # [H, S, T+S]
    allowed = torch.ones(seq, prefix_len + seq, dtype=torch.bool)
    allowed[:, prefix_len:] = torch.ones(seq, seq).tril().bool()  # every prefix slot, causal text
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = (weights @ values).transpose(0, 1).reshape(seq, heads * hd)  # [S, H*hd]
    return _output_projection(family, attn, out)
