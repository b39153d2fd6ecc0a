"""One seed range, from the engine to the wire: what torch's generator takes, each stream once."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ValidationError

from server.api.openai_schemas import ChatCompletionRequest, CompletionRequest
from server.api.schemas import GenerateRequest
from server.engine.checks import MAX_SEED

BODIES: list[tuple[type[BaseModel], dict[str, object]]] = [
    (GenerateRequest, {"prompt": "hi"}),
    (CompletionRequest, {"model": "m", "prompt": "hi"}),
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
]


def test_the_largest_seed_is_one_torch_takes() -> None:
    torch.Generator().manual_seed(MAX_SEED)
    with pytest.raises((OverflowError, RuntimeError, ValueError)):
        torch.Generator().manual_seed(MAX_SEED + 1)


@pytest.mark.parametrize(("schema", "body"), BODIES, ids=lambda v: getattr(v, "__name__", ""))
def test_every_route_takes_the_engines_seed_range(
    schema: type[BaseModel], body: dict[str, object]
) -> None:
    for seed in (0, 2**63, MAX_SEED):  # 2**63 and up: refused by the wire alone before
        assert schema.model_validate({**body, "seed": seed}).seed == seed  # type: ignore[attr-defined]
    for seed in (-1, MAX_SEED + 1):
        with pytest.raises(ValidationError):
            schema.model_validate({**body, "seed": seed})
