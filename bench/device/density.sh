#!/usr/bin/env bash
# Runs bench/density in gpu mode on the GPU machine (carry .whl and .deb). Results go to $OUT.
set -uo pipefail
. "$(dirname "$0")/env.sh"
python3 -m bench.density --mode gpu --python-path $SITE --runc /opt/debs/usr/sbin/runc \
  --work-dir /tmp/sw-density --out "$OUT/density-h100.json" "$@" 2>&1 | tee "$OUT/density.log"
rc=${PIPESTATUS[0]}
[ -d /tmp/sw-density/var/logs ] && tar czf "$OUT/density-logs.tgz" -C /tmp/sw-density/var/logs .
free -g > "$OUT/free.txt"; nvidia-smi >> "$OUT/free.txt"
exit $rc
