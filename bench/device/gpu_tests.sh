#!/usr/bin/env bash
# Runs the GPU-marked tests on the GPU machine (carry .whl and .deb). Logs go to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/debs && for f in .deb/*.deb; do dpkg -x "$f" /tmp/debs; done
export PATH=/tmp/debs/usr/sbin:/tmp/debs/usr/bin:$PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --continue-on-collection-errors -m gpu tests "$@" 2>&1 | tee "${OUT:-/tmp}/gpu-tests.log"
