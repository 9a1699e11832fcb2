#!/usr/bin/env bash
# Runs bench/disk_start, then bench/disk_start_e2e, on the GPU machine (carry .whl and .deb), in
# at most ~9.5 minutes all told: (1) the blobstore's GPU handover tests (the miss path into a
# cuMemCreate allocation, read back by a child process); (2) the disk's own O_DIRECT read
# bandwidth and the blobstore's cache-miss load of the 8B model's snapshot (16.06 GB) from disk
# into GPU memory; (3) CS-TTFT through the gateway for the 8B model, host cache dropped (blobstore
# restarted) against cached, side by side. Results and logs go to $OUT: disk-start-h100.json,
# disk-start-e2e-h100.json, disk_start.log, disk_start_e2e.log, disk-env.txt, disk-gpu-tests.log,
# disk-e2e-logs.tgz. Extra arguments go to bench/disk_start.
set -uo pipefail
start=$SECONDS
. "$(dirname "$0")/env.sh"
left() { echo $(( 570 - (SECONDS - start) )); }
{
  date -u; uname -a; nproc; free -g; df -hT; lsblk -o NAME,SIZE,ROTA,TYPE,MOUNTPOINT,MODEL 2>&1
  grep -E ' / | /tmp | /var ' /proc/mounts; cat /sys/block/*/queue/max_sectors_kb 2>&1 | head -5
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
  python3 -c 'import torch, cuda.bindings; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
  grep -m1 -o -w sha_ni /proc/cpuinfo || echo "no sha_ni"
  echo "env.sh took $((SECONDS - start)) s"
} > "$OUT/disk-env.txt" 2>&1
t=$(left); [ "$t" -gt 90 ] && t=90
timeout "$t" python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" tests/inproc/test_blobstore_gpu.py \
  2>&1 | tail -n 60 > "$OUT/disk-gpu-tests.log"
t=$(left); [ "$t" -gt 260 ] && t=260
timeout "$t" python3 -m bench.disk_start --sweep 16 --out "$OUT/disk-start-h100.json" "$@" 2>&1 | tee "$OUT/disk_start.log"
rc=${PIPESTATUS[0]}
echo "disk_start exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/disk_start.log"
rm -rf /var/tmp/snapwake-disk-start "$PWD/var/disk-start" /tmp/snapwake-disk-start /root/snapwake-disk-start
t=$(left)
if [ "$t" -gt 150 ]; then
  timeout "$t" python3 -m bench.disk_start_e2e --preset 8b --python-path "$SITE" --runc /opt/debs/usr/sbin/runc \
    --out "$OUT/disk-start-e2e-h100.json" --seccomp-profile /opt/debs/usr/share/containers/seccomp.json \
    --driver-lib-dir /usr/local/nvidia/lib64 2>&1 | tee "$OUT/disk_start_e2e.log"
  echo "disk_start_e2e exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$OUT/disk_start_e2e.log"
  [ -d /tmp/snapwake-bench/8b/logs ] && tar czf "$OUT/disk-e2e-logs.tgz" -C /tmp/snapwake-bench/8b/logs . 2>/dev/null
else
  echo "disk_start_e2e skipped: only $t s left" | tee "$OUT/disk_start_e2e.log"
fi
exit $rc
