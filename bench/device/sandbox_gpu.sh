#!/usr/bin/env bash
# The instance sandbox on the GPU machine (carry .whl and .deb; see fetch_deps.sh, which also
# needs `apt-get download golang-github-containers-common libseccomp2` into .deb).
set -uo pipefail
umask 022
. "$(dirname "$0")/env.sh"
chmod -R o+rX "$PWD" "$SITE"  # the container's root is an unprivileged host user
ldconfig -p | grep -q libseccomp.so.2 || export LD_LIBRARY_PATH=/opt/debs/usr/lib/x86_64-linux-gnu
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
ls -la /dev/nvidia* | head; ls /usr/local/nvidia/lib64 2>/dev/null | grep -E "libcuda|libnvidia-ml" | head
timeout 540 python3 bench/device/sandbox_gpu.py 2>&1 | tee "$OUT/sandbox_gpu.log"
