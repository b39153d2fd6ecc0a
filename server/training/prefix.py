"""The trainable prefix: one `P_theta [T, d_model]` per layer, the only thing that learns.

Two parameterisations give the same thing to the model, `p_theta()` -> [L, T, d_model]:
- `DirectPrefix`: P_theta itself is one `nn.Parameter` of shape [L, T, d_model] (the seed's method).
- `MlpPrefix`: Li & Liang's reparameterisation, a smaller embedding [T, d_model] passed through a
  two-layer MLP (Linear -> tanh -> Linear) to [L, T, d_model]; it often trains more stably. On
  export the MLP is run once and dropped: the artifact holds the plain P_theta.

Initialisation (the seed's two methods):
- "words": the input-embedding rows of `init_text`'s tokens, truncated or repeated to T, the same
  values at every layer (each layer's own W_k / W_v still makes its keys and values differ);
- "random": N(0, init_std) drawn independently for every layer.
With the MLP, the init goes into its input embedding and the MLP starts from PyTorch's default
(seeded) initialisation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from server.training.config import TrainConfig, TrainConfigError


class DirectPrefix(nn.Module):
    """P_theta as one parameter [L, T, d_model]."""

    def __init__(self, init: Tensor) -> None:
        super().__init__()
        self.p_theta = nn.Parameter(init.detach().clone().float())  # [L, T, d_model]

    def forward(self) -> Tensor:
        return self.p_theta


class MlpPrefix(nn.Module):
    """P_theta = MLP(E): E [T, d_model] -> Linear(d, h) -> tanh -> Linear(h, L * d) -> [L, T, d]."""

    def __init__(self, embedding: Tensor, num_layers: int, hidden: int) -> None:
        super().__init__()
        prefix_len, d_model = embedding.shape
        self.num_layers = num_layers
        self.embedding = nn.Parameter(embedding.detach().clone().float())  # [T, d_model]
        self.mlp = nn.Sequential(
            nn.Linear(d_model, hidden), nn.Tanh(), nn.Linear(hidden, num_layers * d_model)
        )

    def forward(self) -> Tensor:
        prefix_len, d_model = self.embedding.shape
        flat = self.mlp(self.embedding)  # [T, L * d_model]
        return flat.view(prefix_len, self.num_layers, d_model).transpose(0, 1)  # [L, T, d_model]


PrefixModule = DirectPrefix | MlpPrefix


def build_prefix(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    num_layers: int,
    config: TrainConfig,
) -> PrefixModule:
    """The trainable prefix for `model`, initialised per `config` (reproducible from its seed)."""
    d_model = int(embedding_table(model).shape[1])
    generator = torch.Generator().manual_seed(config.seed)
    layers = 1 if config.reparam == "mlp" else num_layers
    if config.init == "words":
        rows = word_rows(model, tokenizer, config.init_text, config.prefix_len)  # [T, d_model]
        init = rows.unsqueeze(0).expand(layers, -1, -1)  # the same rows at every layer
    else:
        shape = (layers, config.prefix_len, d_model)
        init = torch.randn(shape, generator=generator) * config.init_std  # independent per layer
    if config.reparam == "none":
        return DirectPrefix(init)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the MLP's default init, reproducibly
        return MlpPrefix(init[0], num_layers, config.mlp_hidden)


def word_rows(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, prefix_len: int
) -> Tensor:
    """Input-embedding rows of `text`'s tokens, repeated/truncated to `prefix_len`: [T, d_model]."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise TrainConfigError(f"init_text {text!r} encodes to no tokens")
    ids = (ids * (prefix_len // len(ids) + 1))[:prefix_len]
    table = embedding_table(model)  # [vocab, d_model], frozen
    index = torch.tensor(ids, device=table.device)
    return table.detach()[index].float().cpu()


def embedding_table(model: PreTrainedModel) -> Tensor:
    """The model's input embedding matrix [vocab, d_model]."""
    weight = model.get_input_embeddings().weight
    assert isinstance(weight, Tensor)
    return weight


def export_p_theta(prefix: PrefixModule) -> Tensor:
    """The plain seed-form P_theta [L, T, d_model] (float32, CPU); the MLP, if any, collapsed."""
    with torch.no_grad():
        return prefix().detach().float().cpu().contiguous()
