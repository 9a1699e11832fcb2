#!/usr/bin/env bash
# Issue 11's placement run on a machine with two (or more) GPUs (kind nvidia-h100-x2; carry .whl
# and .deb): bench/multigpu through the whole platform. Results and logs go to $OUT.
set -uo pipefail
umask 022
. "$(dirname "$0")/env.sh"
chmod -R o+rX "$PWD" "$SITE"  # the built-in server's container reads them as an unprivileged user
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
lib=/usr/local/nvidia/lib64; [ -e $lib/libcuda.so.1 ] || lib=""
timeout ${MGPU_LIMIT_S:-540} python3 -m bench.multigpu --out "$OUT/multigpu.json" --runc /opt/debs/usr/sbin/runc \
  --seccomp-profile /opt/debs/usr/share/containers/seccomp.json ${lib:+--driver-lib-dir $lib} \
  --python-path "$SITE" "$@" 2>&1 | tee "$OUT/multigpu.log"
rc=${PIPESTATUS[0]}
find /tmp/swmgpu -name output.log | head -6 | xargs -r tail -n 30 > "$OUT/instance-logs.txt" 2>/dev/null
(cd /tmp/swmgpu 2>/dev/null && find . -name "*.log" -size -20M | tar czf "$OUT/mgpu-logs.tgz" -T -)
exit $rc
