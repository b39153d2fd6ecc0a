from __future__ import annotations

from collections.abc import Iterator

import pytest

from server.models.loader import LoadedModel, load_model
from tests.training.tasks import single_thread


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dir) -> LoadedModel:
    """The tiny Llama (grouped-query attention), loaded the way a user's model is."""
    return load_model(str(tiny_model_dir("llama")), dtype="float32", device="cpu")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with single_thread():
        yield
