"""Loading: frozen model, shapes, defaults, fingerprint identity, and clear refusals."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    OPTForCausalLM,
    PretrainedConfig,
    T5Config,
)

from server.models.families import UnsupportedModelError, family_for
from server.models.loader import LoadedModel, ModelLoadError, load_model, resolve_dtype
from tests.tiny import FAMILIES

# (num_kv_heads, head_dim) of the tiny configs in tests/tiny.py, written out independently.
EXPECTED_HEADS = {
    "gpt2": (4, 16),
    "llama": (2, 16),
    "qwen2": (2, 16),
    "qwen3": (2, 32),
    "gpt_neox": (4, 16),
}
SUPPORTED_NAMES = ("GPT-2", "Llama", "Qwen2", "Qwen3", "GPT-NeoX")


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_model_is_frozen_and_described(
    loaded_tiny: Callable[..., LoadedModel], tiny_model_dir: Callable[..., Path], family: str
) -> None:
    loaded = loaded_tiny(family)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert not any(module.training for module in loaded.model.modules())
    assert loaded.family.name == family
    assert loaded.name == str(tiny_model_dir(family))
    assert (loaded.device, loaded.dtype) == (torch.device("cpu"), torch.float32)
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.max_context == 256
    assert loaded.model.config._attn_implementation == "eager"  # the CPU default
    fp = loaded.fingerprint
    assert (fp.family, fp.num_layers, fp.hidden_size, fp.vocab_size) == (family, 2, 64, 384)
    assert (fp.num_kv_heads, fp.head_dim) == EXPECTED_HEADS[family]
    assert fp.architecture == loaded.model.config.architectures[0]
    assert len(fp.digest) == 64


def test_same_weights_same_fingerprint_wherever_and_however_loaded(
    loaded_tiny: Callable[..., LoadedModel], tiny_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    first = loaded_tiny("llama").fingerprint
    again = load_model(str(tiny_model_dir("llama")), dtype="float32").fingerprint
    copy = shutil.copytree(tiny_model_dir("llama"), tmp_path / "elsewhere")
    moved = load_model(str(copy), dtype="float32").fingerprint
    # Documented: samples are rounded to bfloat16 before hashing, so a bf16 load matches.
    bf16 = load_model(str(copy), dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert first == again == moved == bf16.fingerprint
    assert first.mismatch(again) is None


def test_other_weights_same_shapes_differ_in_digest(
    loaded_tiny: Callable[..., LoadedModel],
) -> None:
    seed0, seed1 = loaded_tiny("llama", 0).fingerprint, loaded_tiny("llama", 1).fingerprint
    assert seed0.digest != seed1.digest
    assert seed0.to_dict() | {"digest": ""} == seed1.to_dict() | {"digest": ""}
    message = seed0.mismatch(seed1)
    assert message is not None and "same shapes, different model" in message


def test_prefix_for_another_architecture_is_refused_by_name(
    loaded_tiny: Callable[..., LoadedModel],
) -> None:
    llama, qwen3 = loaded_tiny("llama").fingerprint, loaded_tiny("qwen3").fingerprint
    message = qwen3.mismatch(llama)
    assert message is not None
    assert "LlamaForCausalLM" in message and "Qwen3ForCausalLM" in message
    assert "head_dim differs (16 != 32)" in message


def test_unsupported_architecture_on_disk_is_refused(tmp_path: Path) -> None:
    config = OPTConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        word_embed_proj_dim=16,
        max_position_embeddings=32,
    )
    OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path / "opt"))
    message = str(info.value)
    assert "OPTForCausalLM" in message
    assert all(name in message for name in SUPPORTED_NAMES)


@pytest.mark.parametrize("config", [T5Config(), OPTConfig()], ids=["t5", "opt"])
def test_family_for_refuses_with_the_supported_list(config: PretrainedConfig) -> None:
    with pytest.raises(UnsupportedModelError) as info:
        family_for(config)
    assert isinstance(info.value, ValueError)
    assert all(name in str(info.value) for name in SUPPORTED_NAMES)


def test_mistral_and_llama_share_a_family() -> None:
    assert family_for(LlamaConfig()).name == "llama"
    assert family_for(MistralConfig()).name == "llama"


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))


def test_directory_without_a_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(str(tmp_path))


def test_unknown_hub_id_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline mode: fail at once instead of retrying an unreachable hub.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        load_model("no-such-org/no-such-model")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "float8"}, "invalid dtype"),
        ({"device": "tpu"}, "device"),
        ({"device": "cuda:7"}, "no such CUDA device"),
    ],
)
def test_bad_options_are_clear_errors(
    tiny_model_dir: Callable[..., Path], kwargs: dict[str, str], match: str
) -> None:
    if kwargs.get("device") == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ModelLoadError, match=match):
        load_model(str(tiny_model_dir("gpt2")), **kwargs)


def test_auto_dtype_follows_the_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    bf16, fp16 = LlamaConfig(dtype="bfloat16"), LlamaConfig(dtype="float16")
    assert resolve_dtype("auto", bf16, cpu) == torch.bfloat16
    assert resolve_dtype("auto", fp16, cpu) == torch.float32  # fp16 matmuls are slow on CPU
    assert resolve_dtype("auto", LlamaConfig(), cpu) == torch.float32
    assert resolve_dtype("auto", fp16, cuda) == torch.float16
    assert resolve_dtype("auto", LlamaConfig(), cuda) == torch.float32
    assert resolve_dtype("bfloat16", fp16, cpu) == torch.bfloat16


def test_auto_dtype_keeps_a_bf16_checkpoint_in_bf16_on_cpu(
    tiny_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    source = load_model(str(tiny_model_dir("qwen2")), dtype="bfloat16")
    source.model.save_pretrained(tmp_path / "bf16")
    source.tokenizer.save_pretrained(tmp_path / "bf16")
    loaded = load_model(str(tmp_path / "bf16"), device="cpu")
    assert loaded.dtype == torch.bfloat16 == next(loaded.model.parameters()).dtype
    assert loaded.fingerprint == source.fingerprint


def test_tokenizer_without_pad_gets_eos(
    tiny_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    path = shutil.copytree(tiny_model_dir("llama"), tmp_path / "nopad")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).pad_token is None
    loaded = load_model(str(path))
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token is not None


def test_attention_implementation_can_be_chosen(tiny_model_dir: Callable[..., Path]) -> None:
    loaded = load_model(str(tiny_model_dir("qwen3")), attn_implementation="sdpa")
    assert loaded.model.config._attn_implementation == "sdpa"
