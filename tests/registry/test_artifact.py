"""The artifact file: exact round trips, metadata in the safetensors header (read back with
safetensors' own reader), and the canonical content hash (checked against a separate
implementation written here)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from prefix_registry.artifact import META_KEY, PrefixArtifact, PrefixMeta, content_hash
from prefix_registry.errors import InvalidPrefixError
from prefix_registry.validation import Limits
from tests.registry.conftest import FP, MakeArtifact, make_tensors


def reference_hash(tensors: dict[str, torch.Tensor]) -> str:
    """The documented definition, written independently: name, dtype, shape, raw bytes."""
    names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        as_int = t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)
        h.update(name.encode() + b"\0" + names[t.dtype].encode() + b"\0")
        h.update(",".join(map(str, t.shape)).encode() + b"\0")
        h.update(as_int.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", ["kv", "p_theta"])
def test_round_trip_is_exact(form: str, dtype: torch.dtype) -> None:
    tensors = make_tensors(form, prefix_len=4, seed=3, dtype=dtype)
    artifact = PrefixArtifact.create(
        name="style", tenant="acme", tensors=tensors, model=FP, description="formal tone",
        training={"init": "vocab", "steps": 200, "loss": 1.25},
    ).stored_as(7, 1700000000.5)
    back = PrefixArtifact.from_bytes(artifact.to_bytes(), limits=Limits())
    assert back.meta == artifact.meta
    assert back.meta.dtype == str(dtype).removeprefix("torch.")
    assert set(back.tensors) == set(tensors)
    for name, t in tensors.items():
        assert back.tensors[name].dtype == dtype and torch.equal(back.tensors[name], t)


def test_metadata_is_json_in_the_safetensors_header(tmp_path: Path,
                                                    make_artifact: MakeArtifact) -> None:
    artifact = make_artifact(description="d").stored_as(2, 123.0)
    path = tmp_path / "a.safetensors"
    path.write_bytes(artifact.to_bytes())
    with safetensors.safe_open(path, framework="pt") as f:
        header_meta = json.loads(f.metadata()[META_KEY])
        assert torch.equal(f.get_tensor("keys"), artifact.tensors["keys"])
    assert header_meta["format_version"] == 1
    assert PrefixMeta.from_dict(header_meta) == artifact.meta
    assert header_meta["model"]["digest"] == FP.digest and header_meta["version"] == 2


def test_content_hash_matches_the_documented_definition() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tensors = make_tensors("kv", seed=5, dtype=dtype)
        assert content_hash(tensors) == reference_hash(tensors)
        reordered = {"values": tensors["values"], "keys": tensors["keys"]}
        assert content_hash(reordered) == content_hash(tensors)


def test_content_hash_sees_values_dtype_and_shape() -> None:
    base = make_tensors("kv", seed=1)
    h = content_hash(base)
    changed = {k: v.clone() for k, v in base.items()}
    changed["values"][1, 1, 2, 15] += 1e-6
    assert content_hash(changed) != h
    assert content_hash({k: v.half() for k, v in base.items()}) != h
    reshaped = {k: v.reshape(2, 1, 6, 16) for k, v in base.items()}  # same bytes, other shape
    assert content_hash(reshaped) != h
    transposed = {k: v.transpose(0, 1).contiguous().transpose(0, 1) for k, v in base.items()}
    assert not transposed["keys"].is_contiguous() and content_hash(transposed) == h


def test_tampered_tensors_are_detected(make_artifact: MakeArtifact) -> None:
    artifact = make_artifact()
    meta_json = json.dumps({"format_version": 1, **artifact.meta.to_dict()})
    forged = {k: v + 1 for k, v in artifact.tensors.items()}
    data = safetensors.torch.save(forged, metadata={META_KEY: meta_json})
    with pytest.raises(InvalidPrefixError, match="sha256"):
        PrefixArtifact.from_bytes(data, limits=Limits())


def test_bad_files_are_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.mkdir, (str(marker),))

    for data in (pickle.dumps(Payload()), b"", b"hello world", b"\x10" + b"\0" * 7 + b"[]"):
        with pytest.raises(InvalidPrefixError):
            PrefixArtifact.from_bytes(data)
    assert not marker.exists()
    plain = safetensors.torch.save(make_tensors("kv"))
    with pytest.raises(InvalidPrefixError, match="not a prefix-serve artifact"):
        PrefixArtifact.from_bytes(plain)


def test_malformed_metadata_is_refused(make_artifact: MakeArtifact) -> None:
    tensors = make_artifact().tensors
    for meta in ("{not json", json.dumps({"name": "x"}), json.dumps([1, 2])):
        data = safetensors.torch.save(tensors, metadata={META_KEY: meta})
        with pytest.raises(InvalidPrefixError):
            PrefixArtifact.from_bytes(data)


def test_meta_dict_round_trip(make_artifact: MakeArtifact) -> None:
    meta = make_artifact(training={"loss": 0.5}).stored_as(3, 9.0).meta
    assert PrefixMeta.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
    assert meta.ref == "style@3"
