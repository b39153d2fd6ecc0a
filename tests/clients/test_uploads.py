"""What `upload_prefix` sends for each kind of source, read back with safetensors (independent of
the SDK's serialiser); and that the SDK never imports torch or the server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load as load_numpy

import clients
from clients._uploads import TENSORS_FILENAME, file_parts, tensors_to_safetensors


def test_numpy_p_theta_round_trips() -> None:
    p_theta = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    ((field, (filename, content, ctype)),) = file_parts({"p_theta": p_theta})
    assert (field, filename, ctype) == ("file", TENSORS_FILENAME, "application/octet-stream")
    np.testing.assert_array_equal(load_numpy(content)["p_theta"], p_theta)


def test_torch_kv_including_bf16_and_grad_and_views() -> None:
    keys = torch.randn(2, 2, 5, 4, requires_grad=True)  # [layers, kv_heads, prefix_len, hd]
    values = torch.randn(2, 5, 2, 4).to(torch.bfloat16).transpose(1, 2)  # non-contiguous bf16
    loaded = load_numpy(tensors_to_safetensors({"keys": keys, "values": values}))
    np.testing.assert_array_equal(loaded["keys"], keys.detach().numpy())
    assert loaded["values"].dtype == np.float32  # numpy has no bf16: widened exactly
    assert torch.equal(torch.from_numpy(loaded["values"]).to(torch.bfloat16), values)


def test_float16_is_kept() -> None:
    loaded = load_numpy(tensors_to_safetensors({"p_theta": torch.ones(1, 2, 3, dtype=torch.half)}))
    assert loaded["p_theta"].dtype == np.float16


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({"keys": np.zeros((1, 1, 1, 1), np.float32)}, "must be"),
        ({"p_theta": np.zeros(3), "keys": np.zeros(3)}, "must be"),
        ({"p_theta": np.zeros((1, 2, 3), np.int64)}, "floating point"),
        ({"p_theta": torch.zeros(1, 2, 3, dtype=torch.float8_e4m3fn)}, "convert it to float32"),
    ],
)
def test_bad_tensors_are_refused(tensors: dict, match: str) -> None:
    with pytest.raises(clients.UploadSourceError, match=match):
        tensors_to_safetensors(tensors)


def test_file_is_sent_as_is(tmp_path: Path) -> None:
    path = tmp_path / "formal.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert file_parts(path) == [("file", ("formal.safetensors", path.read_bytes(),
                                          "application/octet-stream"))]
    assert file_parts(str(path)) == file_parts(path)


def test_peft_directory_sends_both_files(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    (tmp_path / "README.md").write_text("not sent")
    parts = file_parts(tmp_path)
    assert [(p[1][0], p[1][2]) for p in parts] == [
        ("adapter_config.json", "application/json"),
        ("adapter_model.safetensors", "application/octet-stream"),
    ]


def test_directory_without_safetensors_weights(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(clients.UploadSourceError, match="adapter_model.bin is not accepted"):
        file_parts(tmp_path)
    with pytest.raises(clients.UploadSourceError, match="no such file"):
        file_parts(tmp_path / "missing.safetensors")


def test_sdk_imports_neither_torch_nor_the_server() -> None:
    code = (
        "import sys, clients, clients.cli; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'server', 'numpy')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
