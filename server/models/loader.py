"""Load the one frozen base model: weights, tokenizer, family and fingerprint.

`load_model` takes what the user passed as `--model` (a Hugging Face model id or a local
directory) and returns a `LoadedModel` that stays resident for the life of the process. The model
is frozen (`eval()`, no parameter requires grad); prefixes are the only thing that ever learns.

Defaults (see docs/models.md):
- device "auto": CUDA when present, else CPU.
- dtype "auto": on CUDA, the checkpoint's own dtype (float32 when it names none); on CPU,
  bfloat16 when the checkpoint is bfloat16 and float32 otherwise (float16 matmuls are slow on CPU).
- attention: "eager" on CPU (faster than SDPA for one-token decode steps there), "sdpa" on CUDA.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prefix_registry.fingerprint import ModelFingerprint
from server.models.families import Family, UnsupportedModelError, family_for, model_dims
from server.models.source import looks_like_path

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_SAMPLES_PER_TENSOR = 64  # strided elements of each weight that go into the digest
# Config fields that say how a model was saved or loaded, not what it is.
_VOLATILE_CONFIG_KEYS = ("dtype", "torch_dtype", "transformers_version", "attn_implementation")


class ModelLoadError(Exception):
    """The base model could not be loaded (missing path, unknown id, unsupported, bad option)."""


@dataclass
class LoadedModel:
    model: PreTrainedModel  # frozen, eval mode, on `device`
    tokenizer: PreTrainedTokenizerBase  # pad token set (eos when the checkpoint has none)
    family: Family
    fingerprint: ModelFingerprint
    name: str  # the --model argument
    device: torch.device
    dtype: torch.dtype
    max_context: int  # max_position_embeddings: prefix + prompt + generated must fit

    def summary(self) -> ModelSummary:
        return ModelSummary(self.tokenizer, self.family, self.fingerprint, self.name,
                            self.device, self.dtype, self.max_context)


@dataclass(frozen=True)
class ModelSummary:
    """A loaded model without its weights: all the HTTP layer needs to know of it. It pickles
    small, so a process that serves HTTP for engines elsewhere (Ray Serve) never loads weights."""

    tokenizer: PreTrainedTokenizerBase
    family: Family
    fingerprint: ModelFingerprint
    name: str
    device: torch.device
    dtype: torch.dtype
    max_context: int


ModelInfo = LoadedModel | ModelSummary


def load_model(
    model: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str | None = None,
    local_files_only: bool = False,
) -> LoadedModel:
    """Load `model` (a Hugging Face id or a local directory) frozen onto one device.

    Args:
        dtype: "auto", "float32", "bfloat16" or "float16".
        device: "auto", "cpu", "cuda" or "cuda:N".
        attn_implementation: a transformers attention implementation; None picks "eager" on CPU
            and "sdpa" on CUDA.
        local_files_only: never reach the hub (a directory, or a hub id already cached; see
            `server.models.source.check_model_source`).
    Raises:
        ModelLoadError: with a message a person can act on.
    """
    torch_device = resolve_device(device)
    hub = {"local_files_only": local_files_only, "trust_remote_code": False}
    config = _load_config(model, hub)
    try:
        family = family_for(config)
    except UnsupportedModelError as exc:
        raise ModelLoadError(f"cannot serve {model!r}: {exc}") from exc
    torch_dtype = resolve_dtype(dtype, config, torch_device)
    attn = attn_implementation or ("eager" if torch_device.type == "cpu" else "sdpa")
    hf_model = _load_weights(model, torch_dtype, torch_device, attn, hub)
    return LoadedModel(
        model=hf_model,
        tokenizer=_load_tokenizer(model, hub),
        family=family,
        fingerprint=model_fingerprint(hf_model, family),
        name=model,
        device=torch_device,
        dtype=torch_dtype,
        max_context=int(config.max_position_embeddings),
    )


def resolve_device(device: str) -> torch.device:
    """Resolve "auto" to CUDA when available, else CPU; check that anything else exists."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"invalid device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not _cuda_index_exists(resolved):
        raise ModelLoadError(f"device {device!r} requested, but no such CUDA device is available")
    return resolved


def _cuda_index_exists(device: torch.device) -> bool:
    if not torch.cuda.is_available():
        return False
    return device.index is None or device.index < torch.cuda.device_count()


def resolve_dtype(dtype: str, config: PretrainedConfig, device: torch.device) -> torch.dtype:
    """The weights' dtype: an explicit choice, or "auto" per the module docstring."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ModelLoadError(f"invalid dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    saved = _config_dtype(config)
    if device.type == "cuda":
        return saved or torch.float32
    return torch.bfloat16 if saved == torch.bfloat16 else torch.float32


def _config_dtype(config: PretrainedConfig) -> torch.dtype | None:
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = DTYPES.get(saved)
    return saved if saved in DTYPES.values() else None


def _load_config(model: str, hub: dict[str, Any]) -> PretrainedConfig:
    if looks_like_path(model) and not Path(model).is_dir():
        raise ModelLoadError(f"model directory {model!r} does not exist")
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(model, **hub)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"cannot load model {model!r}: not a local model directory nor a reachable "
            f"Hugging Face model id ({exc})"
        ) from exc
    return config


def _load_weights(
    model: str, dtype: torch.dtype, device: torch.device, attn: str, hub: dict[str, Any]
) -> PreTrainedModel:
    try:
        hf_model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            model, dtype=dtype, attn_implementation=attn, **hub
        )
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"cannot load the weights of {model!r}: {exc}") from exc
    torch.nn.Module.to(hf_model, device)
    hf_model.eval()
    hf_model.requires_grad_(False)
    return hf_model


def _load_tokenizer(model: str, hub: dict[str, Any]) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **hub)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {model!r}: {exc}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_fingerprint(model: PreTrainedModel, family: Family) -> ModelFingerprint:
    """Shapes a prefix must match, plus a digest of the config and the weights' identity."""
    dims = model_dims(model.config)
    digest = hashlib.sha256()
    digest.update(_config_identity(model.config).encode())
    _hash_weights(model, digest)
    return ModelFingerprint(
        architecture=(model.config.architectures or [type(model).__name__])[0],
        family=family.name,
        num_layers=dims.num_layers,
        hidden_size=dims.hidden_size,
        num_kv_heads=dims.num_kv_heads,
        head_dim=dims.head_dim,
        vocab_size=int(model.config.vocab_size),
        digest=digest.hexdigest(),
    )


def _config_identity(config: PretrainedConfig) -> str:
    """The config as canonical JSON, without fields that depend on how it was saved/loaded."""
    data: dict[str, Any] = config.to_dict()
    kept = {
        key: value
        for key, value in data.items()
        if not key.startswith("_") and key not in _VOLATILE_CONFIG_KEYS
    }
    return json.dumps(kept, sort_keys=True, default=str)


def _hash_weights(model: PreTrainedModel, digest: Any) -> None:
    """Names, shapes and a strided sample of every parameter (tied ones once).

    Samples are rounded to bfloat16 before hashing, so the same checkpoint loaded in float32 or
    bfloat16 gives the same digest; a float16 load of a float32/bfloat16 checkpoint may not.
    """
    samples = []
    for name, param in model.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)};".encode())
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        samples.append(flat[::step][:_SAMPLES_PER_TENSOR].to(torch.bfloat16).float())
    # One device -> host copy for all samples.
    digest.update(torch.cat(samples).cpu().numpy().tobytes())
