"""`bench/gpu_check.py` runs its whole path (build, save, load, static batch, engine, report) on
the CPU with a tiny model, so the one command meant for a GPU machine is known to work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_tiny_runs_end_to_end(tmp_path: Path) -> None:
    results = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--tiny", "--skip-tests",
         "--model-dir", str(tmp_path / "model"), "--results-dir", str(results)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "engine / static batch" in done.stdout
    (written,) = results.glob("gpu_check-tiny-*.json")
    data = json.loads(written.read_text())
    spec = data["spec"]
    assert data["engine"]["tokens"] == data["hf_static"]["tokens"] == (
        spec["requests"] * spec["new_tokens"])
    # float32: the engine and the static batch choose the same greedy tokens for every row.
    assert data["agreement"]["identical_rows"] == data["agreement"]["rows"] == spec["requests"]
    assert data["machine"]["cpu"] and data["machine"]["torch"]
