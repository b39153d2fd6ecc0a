"""Where the base model comes from, checked in about a second, before anything heavy loads.

`--model` is a local directory or a Hugging Face hub id. A directory must exist and hold a
`config.json`. A hub id is checked with one request for its `config.json`, without retries: a
missing or private repository, or an unreachable hub with nothing cached, is one clear error at
once instead of half a minute of retries. When the hub is unreachable but the model is in the
local cache, it is loaded from the cache (`local_files_only`). No torch here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors

log = logging.getLogger("prefix_serve.server")
HUB_TIMEOUT_S = 5.0
CONFIG_FILE = "config.json"


class ModelSourceError(Exception):
    """`--model` names nothing that can be loaded; the message says why."""


@dataclass(frozen=True)
class ModelSource:
    model: str  # what the user passed
    is_directory: bool
    local_files_only: bool  # a hub id served from the local cache: never touch the network


def looks_like_path(model: str) -> bool:
    """A hub id is "name" or "owner/name"; anything else, or anything that exists, is a path."""
    return Path(model).exists() or model.startswith((".", "/", "~")) or model.count("/") > 1


def check_model_source(model: str, *, timeout_s: float = HUB_TIMEOUT_S) -> ModelSource:
    """Where `model` will be loaded from. Raises ModelSourceError when it cannot be."""
    if looks_like_path(model):
        return _check_directory(model)
    cached = _cached_config(model)
    if hub_constants.HF_HUB_OFFLINE:
        if cached:
            return ModelSource(model, is_directory=False, local_files_only=True)
        raise ModelSourceError(
            f"{model!r} is not a local directory, and the Hugging Face hub is off (HF_HUB_OFFLINE)"
            " with no cached copy: pass a model directory, or download it first"
        )
    reachable = _probe_hub(model, timeout_s)
    if reachable is None:
        return ModelSource(model, is_directory=False, local_files_only=False)
    if cached:
        log.warning("the Hugging Face hub is unreachable (%s); loading %s from the local cache",
                    reachable, model)
        return ModelSource(model, is_directory=False, local_files_only=True)
    raise ModelSourceError(
        f"{model!r} is not a local directory, and the Hugging Face hub is unreachable "
        f"({reachable}) with no cached copy: pass a model directory, or run where the hub "
        "can be reached"
    )


def _check_directory(model: str) -> ModelSource:
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelSourceError(f"model directory {model!r} does not exist")
    if not (path / CONFIG_FILE).is_file():
        raise ModelSourceError(
            f"{model!r} has no {CONFIG_FILE}: not a Hugging Face model directory "
            "(save one with `save_pretrained`, or pass a hub id)"
        )
    return ModelSource(model, is_directory=True, local_files_only=True)


def _cached_config(model: str) -> bool:
    try:
        found = huggingface_hub.try_to_load_from_cache(model, CONFIG_FILE)
    except (hub_errors.HFValidationError, ValueError) as exc:
        raise ModelSourceError(f"{model!r} is neither a directory nor a valid hub id") from exc
    return isinstance(found, str)


def _probe_hub(model: str, timeout_s: float) -> str | None:
    """None when the hub has `model`'s config; a reason when the hub can't be reached.
    Raises ModelSourceError when the hub answers that there is no such model."""
    url = huggingface_hub.hf_hub_url(model, CONFIG_FILE)
    try:
        huggingface_hub.get_hf_file_metadata(url, timeout=timeout_s)
    except hub_errors.GatedRepoError as exc:
        raise ModelSourceError(
            f"{model!r} is gated on the Hugging Face hub: accept its terms, then log in "
            "(`hf auth login`) or set HF_TOKEN"
        ) from exc
    except hub_errors.RepositoryNotFoundError as exc:
        raise ModelSourceError(
            f"no model {model!r} on the Hugging Face hub (or it is private: log in with "
            "`hf auth login` or set HF_TOKEN), and no such local directory"
        ) from exc
    except hub_errors.EntryNotFoundError as exc:
        raise ModelSourceError(f"{model!r} on the hub has no {CONFIG_FILE}") from exc
    except hub_errors.HfHubHTTPError as exc:
        return f"HTTP {exc.response.status_code}" if exc.response is not None else str(exc)
    except Exception as exc:  # connection refused, DNS, timeout, proxy: the hub is unreachable
        return f"{type(exc).__name__}: {exc}"[:200]
    return None
