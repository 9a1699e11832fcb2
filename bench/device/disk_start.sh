#!/usr/bin/env bash
# Runs bench/disk_start on the GPU machine (carry .whl and .deb): the disk's own O_DIRECT read
# bandwidth, and the blobstore's cache-miss load of the 8B model's snapshot (16.06 GB) from disk
# into GPU memory. Results and logs go to $OUT (disk-start-h100.json, disk_start.log, disk-env.txt,
# disk-gpu-tests.log).
set -uo pipefail
. "$(dirname "$0")/env.sh"
{
  date -u; uname -a; nproc; free -g; df -hT; lsblk -o NAME,SIZE,ROTA,TYPE,MOUNTPOINT,MODEL 2>&1
  grep -E ' / | /tmp | /var ' /proc/mounts; cat /sys/block/*/queue/max_sectors_kb 2>&1 | head -5
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
  python3 -c 'import torch, cuda.bindings; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
  grep -m1 -o -w sha_ni /proc/cpuinfo || echo "no sha_ni"
} > "$OUT/disk-env.txt" 2>&1
# The GPU handover tests first (the miss path into a cuMemCreate allocation, read back by a child).
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" tests/inproc/test_blobstore_gpu.py \
  2>&1 | tail -n 60 > "$OUT/disk-gpu-tests.log"
timeout 420 python3 -m bench.disk_start --out "$OUT/disk-start-h100.json" "$@" 2>&1 | tee "$OUT/disk_start.log"
rc=${PIPESTATUS[0]}
echo "disk_start exit $rc" | tee -a "$OUT/disk_start.log"
exit $rc
