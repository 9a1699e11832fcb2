#!/usr/bin/env bash
# Runs bench/density in gpu mode on the GPU machine (carry .whl and .deb). Results go to $OUT.
set -uo pipefail
SITE=/opt/snapwake-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl || exit 1
mkdir -p /opt/debs && for f in .deb/*.deb; do dpkg -x "$f" /opt/debs; done
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 PATH=/opt/debs/usr/sbin:/opt/debs/usr/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m bench.density --mode gpu --python-path $SITE --runc /opt/debs/usr/sbin/runc \
  --work-dir /tmp/sw-density --out "$OUT/density-h100.json" "$@" 2>&1 | tee "$OUT/density.log"
rc=${PIPESTATUS[0]}
[ -d /tmp/sw-density/var/logs ] && tar czf "$OUT/density-logs.tgz" -C /tmp/sw-density/var/logs .
free -g > "$OUT/free.txt"; nvidia-smi >> "$OUT/free.txt"
exit $rc
