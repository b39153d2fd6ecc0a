from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from server.models.loader import LoadedModel, load_model


@pytest.fixture(scope="session")
def loaded_tiny(tiny_model_dir: Callable[..., Path]) -> Callable[..., LoadedModel]:
    """Factory: a tiny `family` model loaded in float32 through `load_model` (cached per session).

    Shared between tests: the model is frozen, so no test can change it. Tests that wrap or modify
    a model (PEFT) load their own copy.
    """
    loaded: dict[tuple[str, int], LoadedModel] = {}

    def get(family: str = "llama", seed: int = 0) -> LoadedModel:
        if (family, seed) not in loaded:
            loaded[(family, seed)] = load_model(str(tiny_model_dir(family, seed)), dtype="float32")
        return loaded[(family, seed)]

    return get
