"""The identity of a base model, as far as a prefix is concerned.

A prefix's per-layer keys and values only make sense for the model they were made for. The
fingerprint carries the shape facts a prefix must match plus a digest of the model's config and
weights identity, so a prefix made for another model is refused with a clear message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelFingerprint:
    architecture: str  # e.g. "LlamaForCausalLM"
    family: str  # "gpt2" | "llama" | "qwen2" | "qwen3" | "gpt_neox"
    num_layers: int
    hidden_size: int  # d_model: the width of a P_theta row
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    digest: str  # sha256 hex of the config and of the weights' names, shapes, dtypes and a sample

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFingerprint:
        fields = cls.__dataclass_fields__
        missing = [name for name in fields if name not in data]
        if missing:
            raise ValueError(f"model fingerprint is missing {', '.join(missing)}")
        return cls(**{name: data[name] for name in fields})

    @property
    def short(self) -> str:
        """A human-readable one-liner for error messages."""
        return (
            f"{self.architecture} (layers={self.num_layers}, hidden={self.hidden_size}, "
            f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, digest={self.digest[:12]})"
        )

    def mismatch(self, other: ModelFingerprint) -> str | None:
        """Why a prefix made for `other` can't run on this model, or None when it can."""
        for name in ("num_layers", "num_kv_heads", "head_dim", "hidden_size"):
            if getattr(self, name) != getattr(other, name):
                return (
                    f"prefix was made for {other.short}, but the served model is {self.short}: "
                    f"{name} differs ({getattr(other, name)} != {getattr(self, name)})"
                )
        if self.digest != other.digest:
            return (
                f"prefix was made for {other.short}, but the served model is {self.short}: "
                "same shapes, different model"
            )
        return None
