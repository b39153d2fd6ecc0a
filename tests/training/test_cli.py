"""`prefix-train` end to end on the tiny model: data file -> artifact -> upload -> generation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from clients import PrefixClient
from prefix_registry.artifact import PrefixArtifact
from server.training.cli import build_parser, main
from server.training.data import EncodeOptions, eval_batches, prepare
from server.training.objective import mean_loss
from tests.training.live_server import ADMIN_KEY, live_server
from tests.training.tasks import YES, prompts, records

REPO = Path(__file__).resolve().parents[2]


def _jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(model: Path, train: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--train", str(train), "--output", str(out),
            "--prefix-len", "8", "--epochs", "0", "--max-steps", "100", "--batch-size", "8",
            "--lr", "0.3", "--warmup-steps", "5", "--init-text", "Answer:", "--no-progress",
            "--device", "cpu", "--threads", "1", *extra]


def test_cli_writes_an_artifact_the_registry_reads(tiny_model_dir, tiny_llama, tmp_path, capsys):
    train = _jsonl(tmp_path / "train.jsonl", records(YES, prompts(40, seed=1)))
    val = _jsonl(tmp_path / "val.jsonl", records(YES, prompts(8, seed=2)))
    out = tmp_path / "out" / "yes.safetensors"
    args = _args(tiny_model_dir("llama"), train, out, "--val-file", str(val),
                 "--reparam", "mlp", "--mlp-hidden", "64", "--lr", "0.03",
                 "--description", "always yes")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "val loss" in printed and "tokens/s" in printed and f"wrote {out}" in printed
    artifact = PrefixArtifact.from_bytes(out.read_bytes())
    meta = artifact.meta
    assert (meta.name, meta.form, meta.prefix_len, meta.dtype) == ("yes", "p_theta", 8, "float32")
    assert meta.model == tiny_llama.fingerprint and meta.description == "always yes"
    assert artifact.tensors["p_theta"].shape == (2, 8, 64)
    training = meta.training
    assert (training["init"], training["reparam"], training["steps"]) == ("words", "mlp", 100)
    assert (training["num_train"], training["num_val"], training["lr"]) == (40, 8, 0.03)
    assert training["val_loss"] < 0.6 * training["no_prefix_val_loss"]
    # The stored P_theta (the MLP collapsed) scores the val data exactly as reported.
    data = prepare(val, None, tiny_llama.tokenizer, EncodeOptions(256), val_fraction=0, seed=0)
    batches = eval_batches(data.train, 8, data.pad_id)
    again = mean_loss(tiny_llama, artifact.tensors["p_theta"], batches)
    assert abs(again - training["val_loss"]) < 1e-5


def test_cli_trains_uploads_and_the_server_serves_the_style(tiny_model_dir, tiny_llama, tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", records(YES, prompts(40, seed=1)))
    out = tmp_path / "yes.safetensors"
    held_out = [p for p in prompts(12, seed=7) if p not in set(prompts(40, seed=1))][:5]
    with live_server(tiny_llama, tmp_path / "store") as url:
        with PrefixClient(url, ADMIN_KEY) as admin:
            key = admin.create_tenant("acme").api_key
        args = _args(tiny_model_dir("llama"), train, out, "--val-fraction", "0.2",
                     "--name", "always-yes", "--upload", url, "--api-key", key)
        assert main(args) == 0
        with PrefixClient(url, key) as client:
            info = client.get_prefix("always-yes")
            texts = [client.generate("always-yes", p, max_new_tokens=3).text for p in held_out]
            plain = client.generate(None, held_out[0], max_new_tokens=3).text
    assert (info.version, info.form, info.prefix_len) == (1, "p_theta", 8)
    assert info.training["steps"] == 100 and info.training["init"] == "words"
    assert info.sha256 == PrefixArtifact.from_bytes(out.read_bytes()).meta.sha256
    assert texts == [YES] * len(held_out)
    assert plain != YES


@pytest.mark.parametrize("extra, message", [
    (["--name", "bad name!"], "invalid prefix name"),
    (["--lr", "-1"], "lr must be in"),
    (["--resume"], "--resume without a path needs --checkpoint-dir"),
])
def test_cli_refuses_bad_arguments_before_training(tmp_path, capsys, extra, message):
    train = _jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(SystemExit) as exit_info:
        main(_args(tmp_path / "no-model", train, tmp_path / "o.safetensors", *extra))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_reports_bad_data_and_missing_models(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(_args(tiny_model_dir("llama"), bad, tmp_path / "o.safetensors")) == 1
    assert "bad.jsonl:1: 'prompt' and 'response' must both be strings" in capsys.readouterr().err
    assert main(_args(tmp_path / "nowhere", bad, tmp_path / "o.safetensors")) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_help_needs_no_torch_and_documents_every_option():
    code = ("import sys\nfrom server.training.cli import build_parser\n"
            "text = build_parser().format_help()\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nprint(text)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=REPO, env=os.environ | {"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "(default: True)" not in result.stdout and "(default: False)" not in result.stdout
    assert "(default: None)" not in result.stdout
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_upload_to_a_dead_server_names_the_url_and_keeps_the_artifact(
        tiny_model_dir, tmp_path, capsys):
    with socket.socket() as sock:  # bound, not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        train = _jsonl(tmp_path / "train.jsonl", records(YES, prompts(8, seed=1)))
        out = tmp_path / "yes.safetensors"
        args = _args(tiny_model_dir("llama"), train, out, "--max-steps", "2", "--name", "yes",
                     "--upload", url, "--api-key", "psk-x")
        assert main(args) == 1
    err = capsys.readouterr().err
    assert f"could not upload to {url}" in err
    assert f"The artifact was kept at {out}" in err and out.is_file()
    assert f"prefixctl --base-url {url} --api-key KEY upload yes {out}" in err
