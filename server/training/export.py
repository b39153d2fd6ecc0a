"""A trained prefix -> a registry artifact (safetensors) -> optionally, the server.

The artifact holds `{"p_theta": [L, T, d_model]}` (form `p_theta`, float32) with the base model's
fingerprint and the run's numbers under `training`; the server's registry reads it as is, and
`PrefixArtifact.from_bytes` reads it back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefix_registry.artifact import PrefixArtifact
from prefix_registry.fingerprint import ModelFingerprint
from server.training.config import TrainResult

DEFAULT_TENANT = "default"  # a local artifact's owner; the server re-assigns it on upload


def to_artifact(
    result: TrainResult,
    fingerprint: ModelFingerprint,
    *,
    name: str,
    tenant: str = DEFAULT_TENANT,
    description: str = "",
) -> PrefixArtifact:
    """The registry artifact of a run (validated against the model's fingerprint)."""
    return PrefixArtifact.create(
        name=name, tenant=tenant, tensors={"p_theta": result.p_theta.float().contiguous()},
        model=fingerprint, description=description, training=result.training_metadata(),
    )


def save_artifact(artifact: PrefixArtifact, path: Path) -> Path:
    """Write the artifact's safetensors bytes to `path` (atomically: temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(artifact.to_bytes())
    os.replace(tmp, path)
    return path


def upload_artifact(
    path: Path, *, base_url: str, name: str, api_key: str | None = None, description: str = ""
) -> Any:
    """Upload the artifact file through the SDK as the next version of `name`; its PrefixInfo.

    `api_key` None lets the SDK fall back to its environment variable.
    """
    from clients import PrefixClient  # the SDK is only needed for uploads

    with PrefixClient(base_url, api_key) as client:
        return client.upload_prefix(name, path, description=description or None)
