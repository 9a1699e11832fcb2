#!/usr/bin/env bash
# Runs bench/coldstart on the GPU machine (carry .whl and .deb). Results and logs go to $OUT.
set -uo pipefail
. "$(dirname "$0")/env.sh"
python3 -m bench.coldstart --python-path $SITE --runc /opt/debs/usr/sbin/runc --out "$OUT/coldstart.json" "$@" 2>&1 | tee "$OUT/coldstart.log"
rc=${PIPESTATUS[0]}
for d in /tmp/snapwake-bench/*/logs; do [ -d "$d" ] && tar czf "$OUT/logs-$(basename "$(dirname "$d")").tgz" -C "$d" . ; done
find /tmp/snapwake-bench -name output.log -path '*instances*' | head -5 | xargs -r tail -n 30 > "$OUT/instance-logs.txt" 2>/dev/null
exit $rc
