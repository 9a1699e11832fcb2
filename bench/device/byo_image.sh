#!/usr/bin/env bash
# Bring-your-own-image on the GPU machine (carry .whl and .deb; see fetch_deps.sh): builds the
# `transformers serve` image from the machine's own Python as an oci: layout, then runs
# bench/byo_image (normal start vs process-mode CS-TTFT through the gateway). Results: $OUT.
set -uo pipefail
umask 022
. "$(dirname "$0")/env.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
lib=/usr/local/nvidia/lib64; [ -e $lib/libcuda.so.1 ] || lib=""
timeout ${BYO_LIMIT_S:-560} python3 -m bench.byo_image --out "$OUT/byo-image.json" --runc /opt/debs/usr/sbin/runc \
  --seccomp-profile /opt/debs/usr/share/containers/seccomp.json ${lib:+--driver-lib-dir $lib} \
  "$@" 2>&1 | tee "$OUT/byo-image.log"
rc=${PIPESTATUS[0]}
tar czf "$OUT/byo-logs.tgz" -C /tmp/swbyo --exclude='*/images/*' --exclude='*/rootfs/*' --exclude='*.sock' . 2>/dev/null
find /tmp/swbyo -name output.log | head -4 | xargs -r tail -n 40 > "$OUT/instance-logs.txt" 2>/dev/null
exit $rc
