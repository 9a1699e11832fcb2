#!/usr/bin/env bash
# Runs bench/batching on the GPU machine (carry .whl and .deb). Results go to $OUT.
set -uo pipefail
. "$(dirname "$0")/env.sh"
python3 -m bench.batching --out "$OUT/batching-h100.json" "$@" 2>&1 | tee "$OUT/batching.log"
