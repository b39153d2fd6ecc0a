"""Checks every prefix passes before it is stored or served; each error names the problem.

Shapes follow docs/architecture.md: `p_theta` is [num_layers, prefix_len, d_model]; `keys` and
`values` are each [num_layers, num_kv_heads, prefix_len, head_dim].
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from prefix_registry.errors import (
    InvalidPrefixError,
    PrefixTooLargeError,
    UnsafeFileError,
    excerpt,
)
from prefix_registry.fingerprint import ModelFingerprint

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^[0-9]{1,9}$")
KEY_HASH_RE = re.compile(r"^[0-9a-f]{32,128}$")
ALLOWED_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
FORMS = ("p_theta", "kv")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MiB = 2**20


@dataclass(frozen=True)
class Limits:
    """What the registry accepts; one instance is built from the server's settings."""

    max_prefix_len: int = 512  # virtual tokens; the minimum is 1
    max_prefix_bytes: int = 256 * MiB  # raw tensor bytes of one prefix
    max_upload_bytes: int = 320 * MiB  # all uploaded files together, archives once extracted
    max_archive_members: int = 64


def validate_name(name: object, what: str = "prefix name") -> str:
    """`name` if it is 1-64 chars of [a-zA-Z0-9._-] starting alphanumeric (so no `@`, `:`, `/`)."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidPrefixError(
            f"invalid {what} {excerpt(name)}: use 1-64 characters from a-z A-Z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return name


def validate_key_hash(key_hash: str) -> str:
    """A key hash is lowercase hex (the HTTP layer stores sha256 hex digests)."""
    if not KEY_HASH_RE.match(key_hash):
        raise InvalidPrefixError("invalid API key hash: expected 32-128 lowercase hex digits")
    return key_hash


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`"name"` -> (name, None) meaning the latest version; `"name@3"` -> (name, 3)."""
    name, sep, version = ref.partition("@")
    validate_name(name)
    if not sep:
        return name, None
    if not VERSION_RE.match(version) or int(version) < 1:
        raise InvalidPrefixError(
            f"invalid prefix reference {excerpt(ref)}: the version must be 1 to 999999999"
        )
    return name, int(version)


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype's registry name, or InvalidPrefixError for a dtype the registry refuses."""
    if dtype not in ALLOWED_DTYPES:
        allowed = ", ".join(ALLOWED_DTYPES.values())
        raise InvalidPrefixError(f"dtype {dtype} is not allowed (use one of {allowed})")
    return ALLOWED_DTYPES[dtype]


def form_of(tensors: Mapping[str, object]) -> str:
    """'p_theta' for {"p_theta"}, 'kv' for {"keys", "values"}; anything else is refused."""
    names = set(tensors)
    if names == {"p_theta"}:
        return "p_theta"
    if names == {"keys", "values"}:
        return "kv"
    found = ", ".join(sorted(names)) or "none"
    raise InvalidPrefixError(
        f"expected one tensor 'p_theta' or two tensors 'keys' and 'values'; found: {found}"
    )


def validate_tensors(
    tensors: Mapping[str, torch.Tensor], model: ModelFingerprint, limits: Limits
) -> tuple[str, int, str]:
    """Check a prefix's tensors against the model it is for; returns (form, prefix_len, dtype)."""
    form = form_of(tensors)
    dtypes = {dtype_name(_tensor(name, t).dtype) for name, t in tensors.items()}
    if len(dtypes) > 1:
        raise InvalidPrefixError(f"keys and values have different dtypes: {sorted(dtypes)}")
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if size > limits.max_prefix_bytes:
        raise PrefixTooLargeError(
            f"prefix tensors are {size} bytes, over the limit of {limits.max_prefix_bytes} bytes"
        )
    if form == "p_theta":
        prefix_len = _check_p_theta(tensors["p_theta"], model)
    else:
        prefix_len = _check_kv(tensors["keys"], tensors["values"], model)
    _check_prefix_len(prefix_len, limits)
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise InvalidPrefixError(f"tensor {name!r} holds NaN or infinite values")
    return form, prefix_len, dtypes.pop()


def _tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InvalidPrefixError(f"{name!r} is not a tensor")
    return value


def _check_p_theta(p_theta: torch.Tensor, model: ModelFingerprint) -> int:
    # [num_layers, prefix_len, d_model]
    want = f"[num_layers={model.num_layers}, prefix_len, d_model={model.hidden_size}]"
    shape = list(p_theta.shape)
    if p_theta.dim() != 3:
        raise InvalidPrefixError(f"p_theta has shape {shape}; the model needs {want}")
    _same("p_theta", shape, want, "num_layers", shape[0], model.num_layers)
    _same("p_theta", shape, want, "d_model", shape[2], model.hidden_size)
    return shape[1]


def _check_kv(keys: torch.Tensor, values: torch.Tensor, model: ModelFingerprint) -> int:
    # each [num_layers, num_kv_heads, prefix_len, head_dim]
    want = (
        f"[num_layers={model.num_layers}, num_kv_heads={model.num_kv_heads}, prefix_len, "
        f"head_dim={model.head_dim}]"
    )
    if keys.shape != values.shape:
        raise InvalidPrefixError(
            f"keys {list(keys.shape)} and values {list(values.shape)} must have the same shape"
        )
    shape = list(keys.shape)
    if keys.dim() != 4:
        raise InvalidPrefixError(f"keys/values have shape {shape}; the model needs {want}")
    _same("keys/values", shape, want, "num_layers", shape[0], model.num_layers)
    _same("keys/values", shape, want, "num_kv_heads", shape[1], model.num_kv_heads)
    _same("keys/values", shape, want, "head_dim", shape[3], model.head_dim)
    return shape[2]


def _same(what: str, shape: list[int], want: str, dim: str, got: int, expected: int) -> None:
    if got != expected:
        raise InvalidPrefixError(
            f"{what} has shape {shape}; the model needs {want}: {dim} is {got}, not {expected}"
        )


def _check_prefix_len(prefix_len: int, limits: Limits) -> None:
    if prefix_len < 1:
        raise InvalidPrefixError("prefix length is 0; a prefix needs at least 1 virtual token")
    if prefix_len > limits.max_prefix_len:
        raise InvalidPrefixError(
            f"prefix length {prefix_len} is over the limit of {limits.max_prefix_len} tokens"
        )


def check_safe_file(filename: str, data: bytes) -> None:
    """Refuse pickle-based files by name and by content; nothing is ever unpickled."""
    lower = filename.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        raise UnsafeFileError(
            f"{filename}: pickle-based checkpoints (.bin/.pt/.pth/.ckpt/.pkl) are refused; "
            "save the adapter with safetensors (save_pretrained(..., safe_serialization=True))"
        )
    if is_pickle(data):
        raise UnsafeFileError(f"{filename}: this is a pickle file; only safetensors is accepted")
    if data[:4] == b"PK\x03\x04" and _zip_holds_pickle(data):
        raise UnsafeFileError(
            f"{filename}: this is a torch checkpoint (zip with data.pkl); only safetensors "
            "is accepted"
        )


def looks_like_safetensors(data: bytes) -> bool:
    """A u64 little-endian header length that fits the file, then the JSON header's `{`."""
    return len(data) >= 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") < len(data)


def is_pickle(data: bytes) -> bool:
    """Pickle protocol 2-5 by its real magic: PROTO (0x80) then the protocol number. A safetensors
    file whose header length starts with byte 0x80 (1 length in 256) is not one."""
    if len(data) < 2 or data[0] != 0x80 or not 2 <= data[1] <= 5:
        return False
    return not looks_like_safetensors(data)


def _zip_holds_pickle(data: bytes) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        return False
    return any(n.rsplit("/", 1)[-1].endswith(".pkl") for n in names)
