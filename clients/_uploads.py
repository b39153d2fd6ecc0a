"""What `upload_prefix` sends: a prefix source turned into multipart `file` parts.

A source is one of
- a file path: sent as is (a native artifact, a raw safetensors with `p_theta` or `keys` +
  `values`, or a tar/zip of a PEFT adapter directory);
- a PEFT adapter directory: its `adapter_config.json` and `adapter_model.safetensors`;
- tensors in memory: `{"p_theta": [num_layers, prefix_len, d_model]}` or
  `{"keys": ..., "values": ...}` (each `[num_layers, num_kv_heads, prefix_len, head_dim]`), as
  numpy arrays or torch tensors, serialised to safetensors here.

The SDK never imports torch: torch tensors are recognised by their `detach` method. numpy has no
bfloat16, so a bf16 tensor is widened to float32 (exactly: every bf16 value is a float32 value).
numpy and safetensors are needed only for tensors in memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class UploadSourceError(ValueError):
    """The prefix source cannot be sent: not a prefix file, adapter directory or tensor dict."""


FilePart = tuple[str, tuple[str, bytes, str]]  # ("file", (filename, content, content type))
PrefixSource = str | os.PathLike[str] | Mapping[str, Any]

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
RAW_FORMS = (frozenset({"p_theta"}), frozenset({"keys", "values"}))
TENSORS_FILENAME = "prefix.safetensors"


def file_parts(source: PrefixSource) -> list[FilePart]:
    """The multipart `file` parts for `source` (read into memory, so a retry can resend them)."""
    if isinstance(source, Mapping):
        return [_part(TENSORS_FILENAME, tensors_to_safetensors(source))]
    path = Path(source)
    if path.is_dir():
        return _peft_parts(path)
    if path.is_file():
        return [_part(path.name, path.read_bytes())]
    raise UploadSourceError(f"no such file or directory: {path}")


def _peft_parts(directory: Path) -> list[FilePart]:
    missing = [name for name in PEFT_FILES if not (directory / name).is_file()]
    if missing:
        hint = ""
        if (directory / "adapter_model.bin").exists():
            hint = " (adapter_model.bin is not accepted: save the adapter with safetensors)"
        raise UploadSourceError(
            f"{directory} is not a PEFT adapter directory: missing {', '.join(missing)}{hint}"
        )
    return [_part(name, (directory / name).read_bytes()) for name in PEFT_FILES]


def _part(filename: str, content: bytes) -> FilePart:
    content_type = "application/json" if filename.endswith(".json") else "application/octet-stream"
    return ("file", (filename, content, content_type))


def tensors_to_safetensors(tensors: Mapping[str, Any]) -> bytes:
    """Serialise `{"p_theta"}` or `{"keys", "values"}` (numpy arrays or torch tensors)."""
    if frozenset(tensors) not in RAW_FORMS:
        raise UploadSourceError(
            "tensors must be {'p_theta': ...} or {'keys': ..., 'values': ...}, "
            f"got keys {sorted(tensors)}"
        )
    numpy, save = _numpy_api()
    arrays = {name: _to_numpy(numpy, name, value) for name, value in tensors.items()}
    return bytes(save(arrays))


def _numpy_api() -> tuple[Any, Any]:
    try:
        import numpy
        from safetensors.numpy import save
    except ImportError as exc:  # pragma: no cover - both come with the dev install
        raise ImportError(
            "uploading tensors from memory needs numpy and safetensors "
            "(pip install numpy safetensors); or save them to a .safetensors file first"
        ) from exc
    return numpy, save


def _to_numpy(numpy: Any, name: str, value: Any) -> Any:
    if hasattr(value, "detach"):  # a torch tensor (duck-typed: the SDK never imports torch)
        value = _torch_to_numpy(name, value)
    array = numpy.ascontiguousarray(numpy.asarray(value))
    if array.dtype.kind != "f":
        raise UploadSourceError(f"tensor {name!r} must be floating point, got dtype {array.dtype}")
    return array


def _torch_to_numpy(name: str, tensor: Any) -> Any:
    tensor = tensor.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
        tensor = tensor.float()  # numpy has no bf16; the widening is exact
    try:
        return tensor.numpy()
    except TypeError as exc:
        raise UploadSourceError(
            f"tensor {name!r} has dtype {tensor.dtype}, which numpy cannot hold: "
            "convert it to float32 (or float16) first"
        ) from exc
