"""Importers: turn uploaded files into a validated prefix, recognising the format by content.

Accepted (docs/registry.md):
- this project's artifact file (safetensors + `prefix-serve` metadata; its fingerprint must match);
- a PEFT PREFIX_TUNING adapter: `adapter_config.json` + `adapter_model.safetensors`, as two files
  or inside one .tar / .tar.gz / .zip;
- a raw safetensors file with `p_theta` [num_layers, prefix_len, d_model] or `keys` + `values`,
  each [num_layers, num_kv_heads, prefix_len, head_dim].
Pickle-based files (.bin/.pt/.pth/.ckpt, pickle bytes, torch zip checkpoints) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefix_registry import safe_json
from prefix_registry.archives import check_zip_entries, extract, is_archive
from prefix_registry.artifact import META_KEY, PrefixArtifact, load_tensors, read_header
from prefix_registry.errors import (
    FingerprintMismatchError,
    InvalidPrefixError,
    PrefixTooLargeError,
)
from prefix_registry.fingerprint import ModelFingerprint
from prefix_registry.peft_adapter import is_peft_config, kv_from_peft
from prefix_registry.validation import (
    Limits,
    check_safe_file,
    looks_like_safetensors,
    validate_tensors,
)

MAX_CONFIG_BYTES = 2**20  # an adapter_config.json is about a KB
IGNORED_SUFFIXES = (".md", ".txt")  # READMEs that PEFT's save_pretrained writes
ACCEPTED = (
    "a prefix-serve artifact, a safetensors file with 'p_theta' or 'keys' + 'values', a PEFT "
    "PREFIX_TUNING adapter (adapter_config.json + adapter_model.safetensors), or a "
    ".tar/.tar.gz/.zip of one"
)


@dataclass(frozen=True)
class ImportedPrefix:
    form: str  # "p_theta" | "kv"
    tensors: dict[str, torch.Tensor]  # validated against the model
    source: str  # "artifact" | "peft" | "raw"
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)

    def to_artifact(
        self,
        *,
        name: str,
        tenant: str,
        model: ModelFingerprint,
        limits: Limits | None = None,
        description: str | None = None,
    ) -> PrefixArtifact:
        """An unstored artifact (version 0) of these tensors; `description` overrides the file's."""
        return PrefixArtifact.create(
            name=name, tenant=tenant, tensors=self.tensors, model=model, limits=limits,
            description=self.description if description is None else description,
            training=self.training,
        )


def import_files(
    files: Mapping[str, bytes], *, model: ModelFingerprint, limits: Limits
) -> ImportedPrefix:
    """Recognise and validate uploaded files (name -> content) as one prefix for `model`."""
    files = _unpack(files, limits)
    kinds = {name: _classify(name, data) for name, data in files.items()}
    configs = [n for n, kind in kinds.items() if kind == "peft-config"]
    tensor_files = [n for n, kind in kinds.items() if kind == "safetensors"]
    if configs:
        if len(configs) > 1 or len(tensor_files) != 1:
            raise InvalidPrefixError(
                "a PEFT adapter is one adapter_config.json plus one adapter_model.safetensors; "
                f"got {sorted(files)}"
            )
        return _import_peft(files[configs[0]], files[tensor_files[0]], model, limits)
    if len(tensor_files) != 1:
        raise InvalidPrefixError(
            f"expected exactly one prefix file; got {sorted(files) or 'none'} ({ACCEPTED})"
        )
    return _import_safetensors(files[tensor_files[0]], model, limits)


def import_path(path: str | Path, *, model: ModelFingerprint, limits: Limits) -> ImportedPrefix:
    """Import a prefix from a file or from a directory's files (e.g. a PEFT save_pretrained)."""
    return import_files(read_path(path, limits), model=model, limits=limits)


def artifact_from_path(
    path: str | Path,
    *,
    name: str,
    tenant: str,
    model: ModelFingerprint,
    limits: Limits | None = None,
    description: str | None = None,
) -> PrefixArtifact:
    """An unstored artifact built from a file or adapter directory on disk."""
    limits = limits or Limits()
    imported = import_path(path, model=model, limits=limits)
    return imported.to_artifact(
        name=name, tenant=tenant, model=model, limits=limits, description=description
    )


def read_path(path: str | Path, limits: Limits) -> dict[str, bytes]:
    """A file, or a directory's top-level regular files, as name -> bytes (size-checked)."""
    path = Path(path)
    if not path.exists():
        raise InvalidPrefixError(f"{path} does not exist")
    paths = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    total = sum(p.stat().st_size for p in paths)
    if total > limits.max_upload_bytes:
        raise PrefixTooLargeError(f"{path}: {total} bytes, over {limits.max_upload_bytes}")
    return {p.name: p.read_bytes() for p in paths}


def _unpack(files: Mapping[str, bytes], limits: Limits) -> dict[str, bytes]:
    """Check sizes and safety; a single archive is replaced by its members."""
    total = sum(len(data) for data in files.values())
    if total > limits.max_upload_bytes:
        raise PrefixTooLargeError(
            f"upload is {total} bytes, over the limit of {limits.max_upload_bytes} bytes"
        )
    for name, data in files.items():
        check_zip_entries(name, data, limits)  # before anything parses a zip's directory
        check_safe_file(name, data)
    archives = [name for name, data in files.items() if is_archive(data)]
    if not archives:
        return _without_docs(files)
    if len(files) != 1:
        raise InvalidPrefixError("upload either one archive or the adapter's files, not both")
    members = extract(archives[0], files[archives[0]], limits)
    for name, data in members.items():
        check_safe_file(name, data)
        if is_archive(data):
            raise InvalidPrefixError(f"{archives[0]}: nested archive {name!r} is not accepted")
    return _without_docs(members)


def _without_docs(files: Mapping[str, bytes]) -> dict[str, bytes]:
    return {
        name: data for name, data in files.items()
        if not name.lower().endswith(IGNORED_SUFFIXES) and Path(name).name != ".gitattributes"
    }


def _classify(name: str, data: bytes) -> str:
    """'safetensors' or 'peft-config' by content; anything else is refused by name."""
    if looks_like_safetensors(data):
        return "safetensors"
    if data.lstrip()[:1] == b"{":
        if is_peft_config(_parse_json(name, data)):
            return "peft-config"
        raise InvalidPrefixError(f"{name}: JSON but not a PEFT adapter config (no peft_type)")
    raise InvalidPrefixError(f"{name}: not a recognised prefix file; expected {ACCEPTED}")


def _parse_json(name: str, data: bytes) -> Any:
    if len(data) > MAX_CONFIG_BYTES:
        raise InvalidPrefixError(f"{name}: {len(data)} bytes, over {MAX_CONFIG_BYTES} for a config")
    return safe_json.loads(data, name)


def _import_safetensors(data: bytes, model: ModelFingerprint, limits: Limits) -> ImportedPrefix:
    if META_KEY in read_header(data)[1]:
        artifact = PrefixArtifact.from_bytes(data, limits=limits)  # fully validated
        why = model.mismatch(artifact.meta.model)
        if why is not None:
            raise FingerprintMismatchError(why)
        meta = artifact.meta
        return ImportedPrefix(meta.form, artifact.tensors, "artifact", meta.description,
                              meta.training)
    tensors = load_tensors(data)
    form, _, _ = validate_tensors(tensors, model, limits)
    return ImportedPrefix(form, tensors, "raw")


def _import_peft(
    config_data: bytes, weights: bytes, model: ModelFingerprint, limits: Limits
) -> ImportedPrefix:
    config = _parse_json("adapter_config.json", config_data)
    keys, values = kv_from_peft(config, load_tensors(weights), model)
    tensors = {"keys": keys, "values": values}
    validate_tensors(tensors, model, limits)
    training = {
        "source": "peft",
        "peft_version": config.get("peft_version"),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "prefix_projection": bool(config.get("prefix_projection", False)),
    }
    return ImportedPrefix("kv", tensors, "peft", training=training)
