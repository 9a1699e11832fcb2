#!/usr/bin/env bash
# Runs the GPU-marked tests on the GPU machine (carry .whl and .deb). Logs go to $OUT.
set -uo pipefail
. "$(dirname "$0")/env.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --continue-on-collection-errors -m gpu tests "$@" 2>&1 | tee "$OUT/gpu-tests.log"
