"""Proof that it works: two prefixes trained on two styles steer the same frozen model, each to
its own style, on prompts they never saw — served through the engine, which computes exactly the
logits training optimised."""

from __future__ import annotations

import pytest
import torch

from prefix_registry.artifact import PrefixArtifact
from server.engine import Engine, EngineConfig, EngineRequest, PrefixSource, SamplingParams
from server.training.config import TrainConfig, TrainResult
from server.training.data import EncodeOptions, Example, collate, encode
from server.training.export import to_artifact
from server.training.loop import train_prefix
from server.training.objective import prefix_logits
from tests.engine.helpers import RecordingRunner, recorder
from tests.training.tasks import NO, YES, prompts, records, single_thread

STYLES = {"yes": YES, "no": NO}
CONFIG = TrainConfig(prefix_len=8, init="words", init_text="Answer:", epochs=0, max_steps=100,
                     batch_size=8, lr=0.3, warmup_steps=5, val_fraction=0.2, progress=False)


@pytest.fixture(scope="module")
def trained(tiny_llama) -> dict[str, TrainResult]:
    train_prompts = prompts(40, seed=1)
    with single_thread():
        return {name: train_prefix(tiny_llama, records(style, train_prompts), config=CONFIG)
                for name, style in STYLES.items()}


@pytest.fixture(scope="module")
def held_out() -> list[str]:
    seen = set(prompts(40, seed=1))
    return [p for p in prompts(30, seed=99) if p not in seen][:20]


def _source(loaded, result: TrainResult, name: str) -> PrefixSource:
    """The prefix as the server gets it: through the artifact's bytes, as the registry stores it."""
    art = PrefixArtifact.from_bytes(to_artifact(result, loaded.fingerprint, name=name).to_bytes())
    return PrefixSource(art.meta.sha256, name, 1, art.meta.form, art.meta.prefix_len,
                        art.tensors, art.meta.model)


async def _serve(loaded, sources, prompt_list, max_new):
    """Greedy completions of every (prefix, prompt) pair in one engine, plus first-step logits."""
    engine = Engine(loaded, EngineConfig(max_batch_size=16), runner=RecordingRunner)
    engine.start()
    try:
        streams = {(name, p): engine.submit(EngineRequest(
            prompt=p, prefix=src, sampling=SamplingParams(max_new_tokens=max_new)))
            for name, src in sources.items() for p in prompt_list}
        texts = {key: (await s.collect()).text for key, s in streams.items()}
        logits = {key: recorder(engine).first_logits[s.request_id]
                  for key, s in streams.items()}
    finally:
        engine.shutdown_now()
    return texts, logits


def test_loss_falls_well_below_the_no_prefix_loss(trained):
    for result in trained.values():
        assert result.steps == 100 and result.num_val == 8
        assert result.no_prefix_val_loss is not None and result.val_loss is not None
        assert result.val_loss < 0.6 * result.no_prefix_val_loss
        assert result.val_loss < result.initial_val_loss  # type: ignore[operator]


async def test_each_prefix_steers_generation_to_its_own_style(tiny_llama, trained, held_out):
    sources = {name: _source(tiny_llama, r, name) for name, r in trained.items()}
    sources["none"] = None  # type: ignore[assignment]
    max_new = len(tiny_llama.tokenizer(NO, add_special_tokens=False)["input_ids"])
    texts, _ = await _serve(tiny_llama, sources, held_out, max_new)

    def accuracy(prefix: str, style: str) -> float:
        return sum(texts[(prefix, p)].startswith(style) for p in held_out) / len(held_out)

    assert accuracy("yes", YES) >= 0.9 and accuracy("no", NO) >= 0.9
    assert accuracy("yes", NO) == accuracy("no", YES) == 0.0
    assert accuracy("none", YES) == accuracy("none", NO) == 0.0


async def test_served_logits_equal_the_training_forward(tiny_llama, trained, held_out):
    """The engine's first-step logits == the training forward's logits at the last prompt token,
    with the example right-padded inside a training batch."""
    sources = {name: _source(tiny_llama, r, name) for name, r in trained.items()}
    some = held_out[:4]
    _, served = await _serve(tiny_llama, sources, some, max_new=1)
    encoded = [encode(Example(p, " yes"), tiny_llama.tokenizer, EncodeOptions(64)) for p in some]
    batch = collate([e for e in encoded if e is not None], pad_id=0)
    prompt_lens = [len(tiny_llama.tokenizer(p)["input_ids"]) for p in some]
    worst = 0.0
    for name, result in trained.items():
        with torch.no_grad():
            logits = prefix_logits(tiny_llama, result.p_theta, batch)  # [B, S, vocab]
        for row, (p, n) in enumerate(zip(some, prompt_lens, strict=True)):
            diff = (logits[row, n - 1] - served[(name, p)]).abs().max().item()
            worst = max(worst, diff)
    assert worst < 1e-5
