"""Hostile files are a 4xx, never a crash: non-object and deeply nested JSON (metadata, the
safetensors header, adapter_config.json), pickle recognised by its real magic (never by a header
length), and archive bombs that hide their bulk in members the importer skips."""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import zipfile

import pytest
import safetensors.torch
import torch

from prefix_registry.artifact import META_KEY, PrefixArtifact, read_header
from prefix_registry.errors import InvalidPrefixError, PrefixTooLargeError, UnsafeFileError
from prefix_registry.formats import import_files
from prefix_registry.validation import Limits
from tests.registry.conftest import FP, make_tensors
from tests.registry.test_formats import peft_files

LIMITS = Limits()
DEEP = "[" * 100_000 + "]" * 100_000


def with_header(header: dict, tail: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + tail


def with_metadata(value: object) -> bytes:
    """A real safetensors file whose `prefix-serve` metadata entry is `value`."""
    data = safetensors.torch.save(make_tensors("kv"))
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = {META_KEY: value}
    return with_header(header, data[8 + n :])


@pytest.mark.parametrize("value", ['"5"', "5", "[1]", "null", 5, [1], {"a": 1}, None, DEEP],
                         ids=lambda v: repr(v)[:12])
def test_metadata_that_is_not_an_object_is_refused(value: object) -> None:
    with pytest.raises(InvalidPrefixError):
        import_files({"a.safetensors": with_metadata(value)}, model=FP, limits=LIMITS)


def test_a_deeply_nested_safetensors_header_is_refused() -> None:
    raw = ('{"a": ' + DEEP + "}").encode()
    with pytest.raises(InvalidPrefixError, match="nested"):
        read_header(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(InvalidPrefixError, match="nested"):
        import_files({"a.safetensors": struct.pack("<Q", len(raw)) + raw}, model=FP,
                     limits=LIMITS)


@pytest.mark.parametrize("nested", [DEEP, '{"a":' * 100_000 + "1" + "}" * 100_000,
                                    "[" * 100_000 + "}"], ids=["arrays", "objects", "unclosed"])
def test_a_deeply_nested_adapter_config_is_refused(nested: str) -> None:
    files = peft_files()
    files["adapter_config.json"] = ('{"peft_type": "PREFIX_TUNING", "x": ' + nested + "}").encode()
    with pytest.raises(InvalidPrefixError, match="nested"):
        import_files(files, model=FP, limits=LIMITS)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    files = peft_files()
    config = json.loads(files["adapter_config.json"])
    config["base_model_name_or_path"] = "[[[[{{{{" * 1000 + '\\"]' + "[" * 500
    files["adapter_config.json"] = json.dumps(config).encode()
    assert import_files(files, model=FP, limits=LIMITS).source == "peft"


def _padded_to_header_length(residue: int, modulus: int = 256) -> bytes:
    """A valid artifact whose 8-byte header length is `residue` mod `modulus` (its first byte
    is then 0x80 for residue 128: what a naive pickle sniff mistakes for pickle)."""
    base = dict(name="p", tenant="t", tensors=make_tensors("p_theta"), model=FP)
    for pad in range(2048):
        data = PrefixArtifact.create(**base, description="x" * pad).to_bytes()
        if struct.unpack("<Q", data[:8])[0] % modulus == residue:
            return data
    raise AssertionError("no padding gave that header length")


def test_a_header_length_of_128_mod_256_is_not_a_pickle() -> None:
    data = _padded_to_header_length(128)
    assert data[:1] == b"\x80"
    imported = import_files({"artifact.safetensors": data}, model=FP, limits=LIMITS)
    assert imported.source == "artifact"
    # and a raw safetensors file (no metadata) of such a header length, with a protocol-like
    # second byte as well
    for second in (2, 3, 4, 5):
        length = 128 + 256 * second
        raw = safetensors.torch.save(make_tensors("kv"), metadata={"pad": ""})
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        header["__metadata__"]["pad"] = "x" * (length - n)
        body = json.dumps(header, separators=(",", ":")).encode()
        body += b" " * (length - len(body))
        data = struct.pack("<Q", len(body)) + body + raw[8 + n :]
        assert data[:2] == bytes([0x80, second])
        assert import_files({"kv.safetensors": data}, model=FP, limits=LIMITS).source == "raw"


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_real_pickles_are_still_refused(protocol: int) -> None:
    data = pickle.dumps({"a": [1, 2, 3]}, protocol=protocol)
    with pytest.raises(UnsafeFileError, match="pickle"):
        import_files({"prefix.safetensors": data}, model=FP, limits=LIMITS)


def _tar_gz(members: dict[str, int]) -> bytes:
    """A tar.gz whose members hold `size` zero bytes each (a bomb compresses ~1000:1)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=9) as tf:
        for name, size in members.items():
            info = tarfile.TarInfo(name)
            info.size = size
            tf.addfile(info, _Zeros(size))
    return buf.getvalue()


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return b"\0" * n


@pytest.mark.parametrize("hidden", ["__MACOSX/bomb", "adapter/._bomb"])
def test_skipped_members_count_toward_the_size_limit(hidden: str) -> None:
    bomb = _tar_gz({hidden: 64 * 2**20, **{f"adapter/{k}": 10 for k in ("a", "b")}})
    assert len(bomb) < 2**20 // 4  # compresses to little; the hidden member extracts to 64 MiB
    with pytest.raises(PrefixTooLargeError, match="extracted size"):
        import_files({"adapter.tar.gz": bomb}, model=FP, limits=Limits(max_upload_bytes=2**20))


@pytest.mark.parametrize("hidden", ["__MACOSX/f{}", "._f{}"])
def test_skipped_members_count_toward_the_member_limit(hidden: str) -> None:
    members = {hidden.format(i): b"" for i in range(100)}
    for data in (_tar_gz(dict.fromkeys(members, 0)), _zip(members)):
        with pytest.raises(InvalidPrefixError, match="more than 64"):
            import_files({"adapter.archive": data}, model=FP, limits=LIMITS)


def test_a_zip_with_too_many_entries_is_refused_before_reading_them() -> None:
    data = _zip({f"__MACOSX/f{i}": b"" for i in range(20_000)})
    with pytest.raises(InvalidPrefixError, match="more than 64"):
        import_files({"adapter.zip": data}, model=FP, limits=LIMITS)


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_non_finite_float_tensors_in_an_adapter_are_refused() -> None:
    files = peft_files()
    weights = torch.full((3, 2 * 2 * 2 * 16), float("inf"))
    files["adapter_model.safetensors"] = safetensors.torch.save({"prompt_embeddings": weights})
    with pytest.raises(InvalidPrefixError, match="NaN or infinite"):
        import_files(files, model=FP, limits=LIMITS)
