#!/usr/bin/env bash
# Runs bench/standby_memory on the GPU machine (carry .whl and .deb): a hot standby's host memory
# before and after the driver checkpoint, today's release against the trimmed one, then the
# cold-standby probe (swap file, process_madvise) and the CUDA arena's GPU tests. Results and
# logs go to $OUT: standby-memory-h100.json, standby-memory.log, standby-logs.tgz, gpu-tests.log.
set -uo pipefail
. "$(dirname "$0")/env.sh"
WORK=/tmp/snapwake-standby
rm -rf "$WORK"; mkdir -p "$WORK"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; free -m; df -T /tmp; cat /proc/swaps; id; } \
  > "$OUT/machine.txt" 2>&1
timeout 420 python3 -m bench.standby_memory --work "$WORK" --out "$OUT/standby-memory-h100.json" "$@" 2>&1 \
  | tee "$OUT/standby-memory.log"
rc=${PIPESTATUS[0]}
tar czf "$OUT/standby-logs.tgz" -C "$WORK" --exclude=models --exclude='*.swap' . 2>/dev/null
swapoff "$WORK/standby.swap" 2>/dev/null; rm -f "$WORK/standby.swap"
# The arena's release/attach on the GPU (the trimmed stack is set back at attach).
timeout 60 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" tests/inproc/test_modelserver_cuda.py \
  2>&1 | tee "$OUT/gpu-tests.log"
exit $rc
