#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels that `python -m bench.gpu_check` needs on a GPU
# machine without network access whose image lacks them or has older versions (e.g. an image
# with transformers 5.17: this project calls the model with `cache=`, which 5.24 takes).
# Copy .whl/ there with the checkout, then:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:. python3 -m bench.gpu_check
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  transformers==5.24.0 redis==8.1.0 pytest==9.0.3 pytest-asyncio==1.5.0
ls -l .whl
