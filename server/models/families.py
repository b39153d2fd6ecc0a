"""The supported architectures and each one's frozen key/value projection path.

A prefix in seed form (`P_theta`, one `[T, d_model]` block per layer) becomes keys and values by
running each layer's own key/value projection on its rows: no input layer norm before it, no
rotary after it (prefix keys carry no position). Each `Family` knows where a model keeps its
decoder layers, which module of a layer is the self-attention, and how it projects keys/values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel


class UnsupportedModelError(ValueError):
    """The model's architecture has no `Family` here."""


@dataclass(frozen=True)
class ModelDims:
    num_layers: int
    hidden_size: int  # d_model
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (< num_heads for grouped-query attention)
    head_dim: int


def model_dims(config: PretrainedConfig) -> ModelDims:
    """The attention shapes of `config`, read the way the modeling code reads them."""
    heads = int(config.num_attention_heads)
    # Qwen3 sets head_dim explicitly (not hidden / heads); Qwen2 may carry head_dim=None.
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelDims(
        num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
    )


# (attention module, x [T, d_model], head_dim) -> (k, v), each [T, H_kv, head_dim]
KvPath = Callable[[nn.Module, Tensor, int], tuple[Tensor, Tensor]]


def _submodule(attn: nn.Module, name: str) -> nn.Module:
    module: nn.Module = getattr(attn, name)
    return module


def _separate_kv(attn: nn.Module, x: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    # Llama / Mistral / Qwen2: k_proj and v_proj are plain Linear layers (Qwen2 with bias).
    k = _submodule(attn, "k_proj")(x).unflatten(-1, (-1, head_dim))
    v = _submodule(attn, "v_proj")(x).unflatten(-1, (-1, head_dim))
    return k, v


def _qwen3_kv(attn: nn.Module, x: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    # Qwen3 normalises each key head with its own RMSNorm (k_norm) before rotary.
    k, v = _separate_kv(attn, x, head_dim)
    return _submodule(attn, "k_norm")(k), v


def _gpt2_kv(attn: nn.Module, x: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    # c_attn is a fused Conv1D with output [q | k | v], each of width hidden.
    _, k, v = _submodule(attn, "c_attn")(x).chunk(3, dim=-1)
    return k.unflatten(-1, (-1, head_dim)), v.unflatten(-1, (-1, head_dim))


def _neox_kv(attn: nn.Module, x: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    # query_key_value's output is laid out per head: [T, heads, (q, k, v) * head_dim].
    qkv = _submodule(attn, "query_key_value")(x).unflatten(-1, (-1, 3 * head_dim))  # [T, H, 3 * hd]
    _, k, v = qkv.chunk(3, dim=-1)
    return k, v


@dataclass(frozen=True)
class Family:
    name: str  # the fingerprint's family name
    label: str  # for people: the architectures it covers
    model_types: tuple[str, ...]  # config.model_type values this family covers
    layers_attr: str  # the decoder layers' ModuleList on the base model
    attention_attr: str  # the self-attention module on one decoder layer
    kv_path: KvPath

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        """The decoder layers of a causal-LM model of this family."""
        base = getattr(model, model.base_model_prefix)
        layers: nn.ModuleList = getattr(base, self.layers_attr)
        return layers

    def attention(self, model: PreTrainedModel, layer_idx: int) -> nn.Module:
        """The self-attention module of layer `layer_idx`."""
        module: nn.Module = getattr(self.layers(model)[layer_idx], self.attention_attr)
        return module

    def project_kv(
        self, model: PreTrainedModel, layer_idx: int, x: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Layer `layer_idx`'s frozen key/value path on rows `x` [T, d_model] (no rotary).

        Returns (k, v), each [H_kv, T, head_dim]; differentiable w.r.t. `x`.
        """
        head_dim = model_dims(model.config).head_dim
        k, v = self.kv_path(self.attention(model, layer_idx), x, head_dim)  # [T, H_kv, hd]
        return k.transpose(0, 1), v.transpose(0, 1)


FAMILIES: tuple[Family, ...] = (
    Family("gpt2", "GPT-2", ("gpt2",), "h", "attn", _gpt2_kv),
    Family(
        "llama", "Llama/Mistral/SmolLM", ("llama", "mistral"), "layers", "self_attn", _separate_kv
    ),
    Family("qwen2", "Qwen2", ("qwen2",), "layers", "self_attn", _separate_kv),
    Family("qwen3", "Qwen3", ("qwen3",), "layers", "self_attn", _qwen3_kv),
    Family("gpt_neox", "GPT-NeoX/Pythia", ("gpt_neox",), "layers", "attention", _neox_kv),
)


def supported_architectures() -> str:
    """For messages: "GPT-2 (model_type gpt2), Llama/Mistral/SmolLM (llama, mistral), ..."."""
    return ", ".join(f"{f.label} (model_type {', '.join(f.model_types)})" for f in FAMILIES)


def family_for(config: PretrainedConfig) -> Family:
    """The family of `config`, or `UnsupportedModelError` naming the supported architectures."""
    model_type = getattr(config, "model_type", "")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    architectures = ", ".join(getattr(config, "architectures", None) or [model_type or "unknown"])
    raise UnsupportedModelError(
        f"unsupported model architecture {architectures} (model_type {model_type!r}); "
        f"supported architectures: {supported_architectures()}"
    )
