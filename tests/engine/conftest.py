from __future__ import annotations

from collections.abc import Callable

import pytest

from server.models.loader import LoadedModel, load_model


@pytest.fixture(scope="session")
def load_tiny(tiny_model_dir) -> Callable[..., LoadedModel]:
    """Factory: a tiny float32 model of `family`, loaded through the real loader (cached)."""
    loaded: dict[str, LoadedModel] = {}

    def get(family: str = "llama") -> LoadedModel:
        if family not in loaded:
            loaded[family] = load_model(str(tiny_model_dir(family)), dtype="float32", device="cpu")
        return loaded[family]

    return get
