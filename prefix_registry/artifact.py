"""A stored prefix: its tensors plus metadata, serialised as one safetensors file.

The metadata travels as JSON under the key `prefix-serve` of the safetensors header's
`__metadata__`; the tensors are `{"p_theta": [num_layers, prefix_len, d_model]}` or
`{"keys", "values"}`, each `[num_layers, num_kv_heads, prefix_len, head_dim]`. Nothing is ever
unpickled.

The content hash (`PrefixMeta.sha256`, the key of the engine's prefix cache) is canonical: sha256
over the tensors in sorted-name order, each contributing
`name \\0 dtype \\0 "d0,d1,..." \\0 raw little-endian bytes` (the tensor made contiguous).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from prefix_registry import safe_json
from prefix_registry.errors import InvalidPrefixError
from prefix_registry.fingerprint import ModelFingerprint
from prefix_registry.validation import Limits, dtype_name, validate_name, validate_tensors

META_KEY = "prefix-serve"  # the __metadata__ entry holding the PrefixMeta JSON
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 2**20  # a prefix's header is a few KB (at most ~70 KB of metadata)
MAX_DESCRIPTION_CHARS = 4096
MAX_TRAINING_JSON_CHARS = 65536


@dataclass(frozen=True)
class PrefixMeta:
    """Everything known about one stored prefix version, without its tensors."""

    name: str
    tenant: str  # owner
    form: str  # "p_theta" | "kv"
    prefix_len: int  # virtual tokens
    model: ModelFingerprint  # the base model it was made for
    dtype: str  # "float32" | "float16" | "bfloat16"
    sha256: str  # content hash of the tensors (see module docstring)
    size_bytes: int  # raw tensor bytes
    version: int = 0  # 0 until stored; the store assigns 1, 2, ...
    created_at: float = 0.0  # unix time, set by the store
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)  # init method, steps, loss, ...

    @property
    def ref(self) -> str:
        """The fixed reference `name@version`."""
        return f"{self.name}@{self.version}"

    @property
    def upload_digest(self) -> str:
        """sha256 of what an upload says (tensors, model, description, training), not of what
        the store assigns (version, time): two uploads with one digest are one upload, so a
        retried one answers with the version the first made (docs/registry.md, idempotency)."""
        said = {"sha256": self.sha256, "model": self.model.to_dict(),
                "description": self.description, "training": self.training}
        return hashlib.sha256(json.dumps(said, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"] = self.model.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any) -> PrefixMeta:
        """Parse metadata from JSON-like data; malformed input raises InvalidPrefixError."""
        try:
            meta = cls(
                name=str(data["name"]),
                tenant=str(data["tenant"]),
                form=str(data["form"]),
                prefix_len=int(data["prefix_len"]),
                model=ModelFingerprint.from_dict(dict(data["model"])),
                dtype=str(data["dtype"]),
                sha256=str(data["sha256"]),
                size_bytes=int(data["size_bytes"]),
                version=int(data.get("version", 0)),
                created_at=float(data.get("created_at", 0.0)),
                description=str(data.get("description", "")),
                training=dict(data.get("training") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidPrefixError(f"malformed prefix metadata: {e}") from e
        return meta


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor in row-major order (works for bfloat16 too)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """The canonical sha256 of a prefix's tensors (see the module docstring)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        shape = ",".join(str(d) for d in t.shape)
        h.update(f"{name}\0{dtype_name(t.dtype)}\0{shape}\0".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def _size(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(frozen=True)
class PrefixArtifact:
    meta: PrefixMeta
    tensors: dict[str, torch.Tensor]

    @classmethod
    def create(
        cls,
        *,
        name: str,
        tenant: str,
        tensors: dict[str, torch.Tensor],
        model: ModelFingerprint,
        limits: Limits | None = None,
        description: str = "",
        training: dict[str, Any] | None = None,
    ) -> PrefixArtifact:
        """Validate `tensors` for `model` and wrap them with computed metadata (version 0)."""
        validate_name(name)
        validate_name(tenant, "tenant name")
        form, prefix_len, dtype = validate_tensors(tensors, model, limits or Limits())
        training = check_extras(str(description), training or {})
        meta = PrefixMeta(
            name=name, tenant=tenant, form=form, prefix_len=prefix_len, model=model, dtype=dtype,
            sha256=content_hash(tensors), size_bytes=_size(tensors),
            description=str(description), training=training,
        )
        return cls(meta=meta, tensors=dict(tensors))

    def validate(self, limits: Limits) -> None:
        """Re-check everything: names, tensors against `meta.model`, and that meta matches them."""
        validate_name(self.meta.name)
        validate_name(self.meta.tenant, "tenant name")
        form, prefix_len, dtype = validate_tensors(self.tensors, self.meta.model, limits)
        derived = {"form": form, "prefix_len": prefix_len, "dtype": dtype,
                   "size_bytes": _size(self.tensors)}
        for key, value in derived.items():
            claimed = getattr(self.meta, key)
            if claimed != value:
                raise InvalidPrefixError(
                    f"metadata says {key}={claimed!r} but the tensors give {value!r}"
                )
        if content_hash(self.tensors) != self.meta.sha256:
            raise InvalidPrefixError("the sha256 in the metadata does not match the tensors")
        check_extras(self.meta.description, self.meta.training)

    def stored_as(self, version: int, created_at: float) -> PrefixArtifact:
        """A copy carrying the version and creation time the store assigned."""
        meta = dataclasses.replace(self.meta, version=version, created_at=created_at)
        return PrefixArtifact(meta=meta, tensors=self.tensors)

    def to_bytes(self) -> bytes:
        """Serialise as safetensors with the metadata JSON in the header."""
        meta = {META_KEY: json.dumps({"format_version": FORMAT_VERSION, **self.meta.to_dict()})}
        # clone: safetensors refuses tensors sharing storage (e.g. keys/values views of one buffer)
        tensors = {k: t.detach().cpu().contiguous().clone() for k, t in self.tensors.items()}
        return safetensors.torch.save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes, *, limits: Limits | None = None) -> PrefixArtifact:
        """Parse an artifact file; with `limits`, fully validate it (untrusted input)."""
        meta_json = read_header(data)[1].get(META_KEY)
        if meta_json is None:
            raise InvalidPrefixError("not a prefix-serve artifact (no 'prefix-serve' metadata)")
        meta = PrefixMeta.from_dict(safe_json.loads_object(meta_json, "artifact metadata"))
        artifact = cls(meta=meta, tensors=load_tensors(data))
        if limits is not None:
            artifact.validate(limits)
        return artifact


def read_header(data: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse a safetensors header without loading tensors: (tensor entries, __metadata__)."""
    if len(data) < 8:
        raise InvalidPrefixError("not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise InvalidPrefixError("not a safetensors file (bad header length)")
    header = safe_json.loads_object(data[8 : 8 + size], "not a safetensors file: its header")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidPrefixError("safetensors __metadata__ is not an object of strings")
    return header, metadata


def load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Load the tensors of a safetensors file held in memory."""
    try:
        return dict(safetensors.torch.load(data))
    except (SafetensorError, ValueError, RuntimeError, TypeError) as e:
        raise InvalidPrefixError(f"invalid safetensors file: {e}") from e


def check_extras(description: str, training: dict[str, Any]) -> dict[str, Any]:
    """The free-form fields: bounded in size, and `training` must be plain JSON."""
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidPrefixError(
            f"description is {len(description)} characters, over {MAX_DESCRIPTION_CHARS}"
        )
    try:
        text = json.dumps(training, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidPrefixError(f"training metadata must be plain JSON: {e}") from e
    if len(text) > MAX_TRAINING_JSON_CHARS:
        raise InvalidPrefixError(
            f"training metadata is {len(text)} characters of JSON, over {MAX_TRAINING_JSON_CHARS}"
        )
    return dict(json.loads(text))
