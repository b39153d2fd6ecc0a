"""PEFT PREFIX_TUNING adapters saved by PEFT itself import to exactly the keys and values PEFT
feeds the model (`PeftModel.get_prompt`), for Llama (grouped-query: 4 heads, 2 kv heads) and
GPT-2; as a directory's files, a .tar.gz and a .zip. The model's own forward with the imported
K/V as its cache reproduces PeftModel's logits."""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import Cache

from prefix_registry.errors import FingerprintMismatchError, InvalidPrefixError, UnsafeFileError
from prefix_registry.fingerprint import ModelFingerprint
from prefix_registry.formats import import_files, import_path, read_path
from prefix_registry.validation import Limits

T = 5  # virtual tokens
ModelDirs = Callable[..., Path]  # the session fixture tiny_model_dir(family)


def fingerprint_of(config: Any) -> ModelFingerprint:
    """The shape facts of a transformers config (the server's loader does this for real)."""
    heads = config.num_attention_heads
    return ModelFingerprint(
        architecture=config.architectures[0], family=config.model_type,
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab_size=config.vocab_size, digest="0" * 64,
    )


def peft_prefix_model(model_dir: Path, projection: bool = False) -> PeftModel:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T,
                                prefix_projection=projection, encoder_hidden_size=24)
    peft_model = get_peft_model(model, config)
    torch.manual_seed(11)
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.normal_(0.0, 1.0)
    peft_model.eval()
    assert isinstance(peft_model, PeftModel)
    return peft_model


def what_peft_feeds(peft_model: PeftModel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each [H_kv, T, hd], from PEFT's own get_prompt."""
    with torch.no_grad():
        prompt = peft_model.get_prompt(batch_size=1)
    assert isinstance(prompt, Cache)  # peft 0.21.2 on transformers 5.x: a DynamicCache
    layers: list[Any] = list(prompt.layers)  # each .keys / .values: [1, H_kv, T, hd]
    return [(layer.keys[0], layer.values[0]) for layer in layers]


def archive(directory: Path, kind: str) -> bytes:
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as zf:
            for p in sorted(directory.iterdir()):
                zf.write(p, f"adapter/{p.name}")
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            tf.add(directory, arcname="adapter")
    return buf.getvalue()


@pytest.mark.parametrize(("family", "projection"),
                         [("llama", False), ("gpt2", False), ("llama", True)])
def test_peft_adapter_imports_to_exactly_what_peft_feeds_the_model(
    family: str, projection: bool, tiny_model_dir: ModelDirs, tmp_path: Path
) -> None:
    peft_model = peft_prefix_model(tiny_model_dir(family), projection)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    expected = what_peft_feeds(peft_model)
    fp = fingerprint_of(peft_model.get_base_model().config)
    assert len(expected) == fp.num_layers and expected[0][0].shape == (fp.num_kv_heads, T,
                                                                        fp.head_dim)
    uploads = {
        "dir": read_path(tmp_path / "adapter", Limits()),
        "tar.gz": {"adapter.tar.gz": archive(tmp_path / "adapter", "tar.gz")},
        "zip": {"adapter.zip": archive(tmp_path / "adapter", "zip")},
    }
    for how, files in uploads.items():
        imported = import_files(files, model=fp, limits=Limits())
        assert (imported.form, imported.source) == ("kv", "peft"), how
        for layer, (k, v) in enumerate(expected):
            assert torch.equal(imported.tensors["keys"][layer], k), (how, layer)
            assert torch.equal(imported.tensors["values"][layer], v), (how, layer)


def test_a_loaded_adapter_and_the_model_forward_agree(tiny_model_dir: ModelDirs, tmp_path: Path
                                                      ) -> None:
    """PeftModel.from_pretrained (inference mode) feeds the same K/V, and the base model run
    with the imported K/V as its cache gives PeftModel.forward's logits."""
    peft_prefix_model(tiny_model_dir("llama")).save_pretrained(str(tmp_path / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    fp = fingerprint_of(base.config)
    imported = import_path(tmp_path / "adapter", model=fp, limits=Limits())
    keys, values = imported.tensors["keys"], imported.tensors["values"]  # [L, H_kv, T, hd]
    for layer, (k, v) in enumerate(what_peft_feeds(loaded)):
        assert torch.equal(keys[layer], k) and torch.equal(values[layer], v)
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        want = loaded(input_ids=ids, attention_mask=torch.ones(1, 4, dtype=torch.long)).logits
        cache = DynamicCache(ddp_cache_data=[(keys[i][None], values[i][None])
                                             for i in range(fp.num_layers)])
        got = base(  # text positions start at T, as in PEFT
            input_ids=ids, attention_mask=torch.ones(1, T + 4, dtype=torch.long),
            position_ids=torch.arange(T, T + 4)[None], cache=cache, use_cache=True,
        ).logits
    torch.testing.assert_close(got, want)


def test_adapter_for_another_model_is_refused(tiny_model_dir: ModelDirs, tmp_path: Path
                                              ) -> None:
    peft_prefix_model(tiny_model_dir("llama")).save_pretrained(str(tmp_path / "adapter"))
    gpt2 = fingerprint_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2")).config)
    with pytest.raises(FingerprintMismatchError, match="num_attention_heads"):
        import_path(tmp_path / "adapter", model=gpt2, limits=Limits())


def test_other_peft_types_and_pickled_adapters_are_refused(
    tiny_model_dir: ModelDirs, tmp_path: Path
) -> None:
    model_dir = tiny_model_dir("llama")
    fp = fingerprint_of(AutoModelForCausalLM.from_pretrained(model_dir).config)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                          LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    lora.save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(InvalidPrefixError, match="'LORA' is not supported"):
        import_path(tmp_path / "lora", model=fp, limits=Limits())
    peft_prefix_model(model_dir).save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").exists()
    with pytest.raises(UnsafeFileError, match=r"adapter_model.bin: pickle-based"):
        import_path(tmp_path / "bin", model=fp, limits=Limits())
    renamed = (tmp_path / "bin" / "adapter_model.bin").read_bytes()  # pickle under a safe name
    files = {"adapter_config.json": (tmp_path / "bin" / "adapter_config.json").read_bytes(),
             "adapter_model.safetensors": renamed}
    with pytest.raises(UnsafeFileError):
        import_files(files, model=fp, limits=Limits())
