from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """Factory: the saved directory of a tiny model of `family` (built once per session)."""
    built: dict[tuple[str, int], Path] = {}

    def get(family: str = "llama", seed: int = 0) -> Path:
        if (family, seed) not in built:
            path = tmp_path_factory.mktemp(f"tiny-{family}-{seed}")
            built[(family, seed)] = make_tiny_model(family, path, seed=seed)
        return built[(family, seed)]

    return get
