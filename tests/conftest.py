from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from server.models.loader import LoadedModel, load_model
from tests.redis_ns import REDIS_URL, RUN_NAMESPACE, delete_namespace, new_namespace, redis_error
from tests.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: the saved directory of a tiny model of `family` (built once per session)."""
    built: dict[tuple[str, int], Path] = {}

    def get(family: str = "llama", seed: int = 0) -> Path:
        if (family, seed) not in built:
            path = tmp_path_factory.mktemp(f"tiny-{family}-{seed}")
            built[(family, seed)] = make_tiny_model(family, path, seed=seed)
        return built[(family, seed)]

    return get


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test: for hundreds of tiny engine steps on a busy 2-core machine,
    a second thread makes each step wait for the other core, tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def loaded(tiny_model_dir: Callable[..., Path]) -> LoadedModel:
    """One tiny Llama loaded through the user's path, shared by every app (it is frozen)."""
    return load_model(str(tiny_model_dir("llama")), dtype="float32")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The real Redis; a test that needs it skips with the reason if it does not answer."""
    error = redis_error()
    if error is not None:
        pytest.skip(f"Redis at {REDIS_URL} does not answer ({error})")
    yield REDIS_URL
    delete_namespace(RUN_NAMESPACE)  # leftovers of crashed tests


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A fresh Redis namespace for one test, removed after it."""
    ns = new_namespace()
    yield ns
    delete_namespace(ns, redis_url)
