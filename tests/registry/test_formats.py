"""import_files: recognising formats by content, refusing unsafe and unknown files, and safe
in-memory archive extraction."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch

from prefix_registry.errors import (
    FingerprintMismatchError,
    InvalidPrefixError,
    PrefixTooLargeError,
    UnsafeFileError,
)
from prefix_registry.formats import artifact_from_path, import_files
from prefix_registry.validation import Limits
from tests.registry.conftest import FP, MakeArtifact, make_tensors

LIMITS = Limits()
L, H, HD = FP.num_layers, FP.num_kv_heads, FP.head_dim


def peft_files(t: int = 3, config_changes: dict[str, object] | None = None) -> dict[str, bytes]:
    """A PEFT-layout adapter for FP written by hand (real PEFT output: test_peft_import.py)."""
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": t,
              "num_layers": L, "num_attention_heads": H, "token_dim": H * HD,
              "num_transformer_submodules": 1, **(config_changes or {})}
    weights = {"prompt_embeddings": torch.randn(t, L * 2 * H * HD)}
    return {"adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": safetensors.torch.save(weights)}


def tar_of(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("form", ["kv", "p_theta"])
def test_raw_safetensors_by_content_whatever_the_name(form: str) -> None:
    tensors = make_tensors(form, prefix_len=4)
    for filename in ("prefix.safetensors", "weights.dat", "x"):
        imported = import_files({filename: safetensors.torch.save(tensors)}, model=FP,
                                limits=LIMITS)
        assert (imported.form, imported.source) == (form, "raw")
        assert all(torch.equal(imported.tensors[k], v) for k, v in tensors.items())


def test_own_artifact_file_keeps_its_metadata(make_artifact: MakeArtifact) -> None:
    artifact = make_artifact(description="formal", training={"steps": 5}).stored_as(4, 1.0)
    imported = import_files({"a.safetensors": artifact.to_bytes()}, model=FP, limits=LIMITS)
    assert imported.source == "artifact" and imported.description == "formal"
    assert imported.training == {"steps": 5}
    assert torch.equal(imported.tensors["values"], artifact.tensors["values"])
    again = imported.to_artifact(name="copy", tenant="beta", model=FP)
    assert again.meta.sha256 == artifact.meta.sha256 and again.meta.description == "formal"


def test_own_artifact_for_another_model_is_refused(make_artifact: MakeArtifact) -> None:
    data = make_artifact().to_bytes()
    other_digest = dataclasses.replace(FP, digest="cd" * 32)
    with pytest.raises(FingerprintMismatchError, match="same shapes, different model"):
        import_files({"a.safetensors": data}, model=other_digest, limits=LIMITS)
    deeper = dataclasses.replace(FP, num_layers=4)
    with pytest.raises(FingerprintMismatchError, match="num_layers differs"):
        import_files({"a.safetensors": data}, model=deeper, limits=LIMITS)


def test_peft_files_by_content_and_docs_ignored() -> None:
    files = peft_files()
    renamed = {"config.json": files["adapter_config.json"],
               "weights": files["adapter_model.safetensors"], "README.md": b"# adapter"}
    imported = import_files(renamed, model=FP, limits=LIMITS)
    assert imported.form == "kv" and imported.tensors["keys"].shape == (L, H, 3, HD)


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"peft_type": "LORA"}, InvalidPrefixError, "'LORA' is not supported"),
        ({"task_type": "SEQ_2_SEQ_LM"}, InvalidPrefixError, "task_type"),
        ({"num_transformer_submodules": 2}, InvalidPrefixError, "encoder-decoder"),
        ({"num_layers": None}, InvalidPrefixError, "num_layers must be a positive integer"),
        ({"num_virtual_tokens": 4}, InvalidPrefixError, r"prompt_embeddings has shape \[3, 128\]"),
        ({"num_layers": 3}, FingerprintMismatchError, "num_layers=3"),
        ({"num_attention_heads": 4, "token_dim": 64}, FingerprintMismatchError,
         "num_attention_heads"),
    ],
)
def test_bad_peft_adapters(changes: dict[str, object], error: type[Exception], message: str
                           ) -> None:
    with pytest.raises(error, match=message):
        import_files(peft_files(config_changes=changes), model=FP, limits=LIMITS)


def test_peft_prefix_is_validated_too() -> None:
    with pytest.raises(InvalidPrefixError, match="over the limit of 2 tokens"):
        import_files(peft_files(t=3), model=FP, limits=Limits(max_prefix_len=2))
    files = peft_files()
    files["adapter_model.safetensors"] = safetensors.torch.save(
        {"prompt_embeddings": torch.full((3, L * 2 * H * HD), float("nan"))})
    with pytest.raises(InvalidPrefixError, match="NaN"):
        import_files(files, model=FP, limits=LIMITS)


@pytest.mark.parametrize("name", ["adapter_model.bin", "model.pt", "x.pth", "y.ckpt", "z.pkl"])
def test_pickle_names_are_refused(name: str) -> None:
    with pytest.raises(UnsafeFileError, match="pickle-based"):
        import_files({name: b"anything"}, model=FP, limits=LIMITS)


def test_pickle_content_is_refused_under_any_name() -> None:
    buf = io.BytesIO()
    torch.save(make_tensors("kv"), buf)  # a zip holding data.pkl
    for data, message in ((buf.getvalue(), "torch checkpoint"),
                          (pickle.dumps({"a": 1}), "pickle file")):
        with pytest.raises(UnsafeFileError, match=message):
            import_files({"prefix.safetensors": data}, model=FP, limits=LIMITS)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"notes.csv": b"hello"}, "not a recognised prefix file"),
        ({"c.json": b'{"a": 1}'}, "not a PEFT adapter config"),
        ({"c.json": b"{oops"}, "invalid JSON"),
        ({}, "expected exactly one prefix file"),
        ({"a.safetensors": safetensors.torch.save(make_tensors("kv")),
          "b.safetensors": safetensors.torch.save(make_tensors("kv"))}, "exactly one"),
        ({"a.safetensors": safetensors.torch.save({"weird": torch.zeros(2)})}, "found: weird"),
        ({"a.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{" + b"x" * 20},
         "not a safetensors file"),
        ({"adapter_config.json": peft_files()["adapter_config.json"]}, "one adapter_config"),
    ],
)
def test_unknown_or_incomplete_uploads(files: dict[str, bytes], message: str) -> None:
    with pytest.raises(InvalidPrefixError, match=message):
        import_files(files, model=FP, limits=LIMITS)


def test_upload_size_limit() -> None:
    files = {"a.safetensors": safetensors.torch.save(make_tensors("kv"))}
    with pytest.raises(PrefixTooLargeError, match="upload is"):
        import_files(files, model=FP, limits=Limits(max_upload_bytes=100))


@pytest.mark.parametrize("pack", [tar_of, lambda m: tar_of(m, "w"), zip_of])
def test_archives_of_an_adapter_directory(pack: Callable[[dict[str, bytes]], bytes]) -> None:
    members = {f"out/adapter/{k}": v for k, v in peft_files().items()}
    members["out/adapter/README.md"] = b"docs"
    imported = import_files({"upload": pack(members)}, model=FP, limits=LIMITS)
    assert imported.source == "peft"


@pytest.mark.parametrize(
    ("members", "error", "message"),
    [
        ({"../evil/adapter_config.json": b"{}"}, UnsafeFileError, "outside the archive"),
        ({"/etc/adapter_config.json": b"{}"}, UnsafeFileError, "absolute path"),
        ({"a/adapter_model.bin": b"x"}, UnsafeFileError, "pickle-based"),
        ({f"f{i}.md": b"" for i in range(70)}, InvalidPrefixError, "more than 64 files"),
        ({"inner.tar.gz": tar_of({"x": b"y"})}, InvalidPrefixError, "nested archive"),
        ({"a/x.json": b"{}", "b/x.json": b"{}"}, InvalidPrefixError, "more than one 'x.json'"),
    ],
)
def test_unsafe_archives(members: dict[str, bytes], error: type[Exception], message: str
                         ) -> None:
    for pack in (tar_of, zip_of):
        with pytest.raises(error, match=message):
            import_files({"upload": pack(members)}, model=FP, limits=LIMITS)


def test_archive_links_are_refused() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        link = tarfile.TarInfo("adapter_config.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        import_files({"a.tar": buf.getvalue()}, model=FP, limits=LIMITS)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        info = zipfile.ZipInfo("adapter_config.json")
        info.external_attr = 0o120777 << 16  # a symlink entry
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeFileError, match="symlink"):
        import_files({"a.zip": zbuf.getvalue()}, model=FP, limits=LIMITS)


@pytest.mark.parametrize("pack", [tar_of, zip_of])
def test_archive_bombs_stop_at_the_size_limit(pack: Callable[[dict[str, bytes]], bytes]
                                              ) -> None:
    data = pack({"adapter_model.safetensors": b"\0" * (8 * 2**20)})
    assert len(data) < 2**20 // 4  # compresses to little; extracts to 8 MiB
    with pytest.raises(PrefixTooLargeError, match="extracted size"):
        import_files({"bomb": data}, model=FP, limits=Limits(max_upload_bytes=2**20))


def test_corrupt_archives_and_archive_plus_files() -> None:
    good = tar_of(peft_files())
    with pytest.raises(InvalidPrefixError, match="not a readable tar"):
        import_files({"a.tar.gz": good[: len(good) // 2]}, model=FP, limits=LIMITS)
    with pytest.raises(InvalidPrefixError, match="not both"):
        import_files({"a.tar.gz": good, **peft_files()}, model=FP, limits=LIMITS)


def test_artifact_from_path(tmp_path: Path) -> None:
    for name, data in peft_files().items():
        (tmp_path / name).write_bytes(data)
    artifact = artifact_from_path(tmp_path, name="formal", tenant="acme", model=FP,
                                  description="from disk")
    assert (artifact.meta.name, artifact.meta.version, artifact.meta.form) == ("formal", 0, "kv")
    assert artifact.meta.description == "from disk"
    assert artifact.meta.training["source"] == "peft"
    with pytest.raises(InvalidPrefixError, match="does not exist"):
        artifact_from_path(tmp_path / "nope", name="x", tenant="acme", model=FP)
