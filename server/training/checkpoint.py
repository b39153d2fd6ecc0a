"""Checkpoint and resume, without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory `step-00000042/` holding
- `tensors.safetensors`: the prefix parameters (`prefix.*`), the best-so-far prefix (`best.*`),
  the optimizer's per-parameter tensors (`optim.<index>.<name>`, e.g. AdamW's exp_avg) and the
  torch RNG states (`rng.cpu`, `rng.cuda.<n>`);
- `state.json`: the step, the run's counters and history, the optimizer's param groups and scalar
  state, the LR schedule, the grad scaler, Python's RNG state, and what the run must match to resume
  (model digest, data digest, prefix shape and parameterisation).
`<checkpoint_dir>/latest` names the newest one; it is written last, so a crash mid-save leaves the
previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from server.training.config import EvalRecord

FORMAT_VERSION = 1
TENSORS, STATE, LATEST = "tensors.safetensors", "state.json", "latest"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or belongs to a different run."""


@dataclass
class RunState:
    """Everything about a run's progress that a resume must restore (besides tensors)."""

    step: int = 0  # optimizer steps done
    best_val: float | None = None
    best_step: int = 0
    bad_evals: int = 0  # validations in a row without improvement
    window_loss: float = 0.0  # sum of step losses since the last validation
    window_steps: int = 0
    last_train_loss: float | None = None
    train_tokens: int = 0  # loss-bearing tokens seen
    processed_tokens: int = 0  # all real tokens run through the forward in training
    train_time_s: float = 0.0  # time inside optimizer steps (for tokens/s), across resumes
    stopped_early: bool = False
    no_prefix_val_loss: float | None = None  # the frozen model alone, on the validation data
    initial_val_loss: float | None = None  # the prefix at initialisation, same data
    history: list[EvalRecord] = field(default_factory=list)
    best_state: dict[str, Tensor] | None = None  # the prefix's state_dict at best_step


def save_checkpoint(
    root: Path,
    prefix: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: RunState,
    extra: dict[str, Any],
    keep: int,
) -> Path:
    """Write `root/step-<step>/`, point `root/latest` at it, keep only the newest `keep`."""
    directory = root / f"step-{state.step:08d}"
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"prefix.{k}": v for k, v in prefix.state_dict().items()}
    for key, value in (state.best_state or {}).items():
        tensors[f"best.{key}"] = value
    optim_tensors, optim_json = _split_optimizer(optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors.update(_rng_tensors())
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              str(directory / TENSORS))
    payload = {"format_version": FORMAT_VERSION, "run": _run_json(state), "optimizer": optim_json,
               "python_rng": _python_rng(), **extra}
    (directory / STATE).write_text(json.dumps(payload, indent=1))
    (root / LATEST).write_text(directory.name)
    _prune(root, keep)
    return directory


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, state json) of a checkpoint directory, or of a checkpoint root's latest."""
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / TENSORS).is_file() or not (path / STATE).is_file():
        raise CheckpointError(f"{path}: not a checkpoint (needs {TENSORS} and {STATE})")
    payload = json.loads((path / STATE).read_text())
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown checkpoint format {payload.get('format_version')}")
    return load_file(str(path / TENSORS)), payload


def restore(
    tensors: dict[str, Tensor],
    payload: dict[str, Any],
    prefix: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> RunState:
    """Load the prefix, optimizer and RNG states; returns the run's state."""
    prefix.load_state_dict(_with_prefix(tensors, "prefix."))
    optimizer.load_state_dict(_join_optimizer(tensors, payload["optimizer"]))
    _restore_rng(tensors, payload["python_rng"])
    run = dict(payload["run"])
    run["history"] = [EvalRecord(**record) for record in run["history"]]
    best = _with_prefix(tensors, "best.")
    return RunState(**run, best_state=best or None)


def check_compatible(payload: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint made for another model, other data or another prefix."""
    for key, want in expected.items():
        have = payload.get(key)
        if have != want:
            raise CheckpointError(
                f"cannot resume: the checkpoint's {key} is {have!r}, this run's is {want!r}"
            )


# ---- helpers ---------------------------------------------------------------------------------

def _run_json(state: RunState) -> dict[str, Any]:
    data = asdict(state)
    data.pop("best_state")
    return data


def _split_optimizer(sd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (its tensors, the JSON-safe rest)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in sd["state"].items():
        scalars[str(index)] = {}
        for name, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{name}"] = value
            else:
                scalars[str(index)][name] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _join_optimizer(tensors: dict[str, Tensor], saved: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(s) for i, s in saved["scalars"].items()}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()}
              for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_tensors() -> dict[str, Tensor]:
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = rng
    return tensors


def _python_rng() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _restore_rng(tensors: dict[str, Tensor], python_rng: list[Any]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = python_rng
    random.setstate((version, tuple(internal), gauss))


def _with_prefix(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old)
