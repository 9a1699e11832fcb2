#!/usr/bin/env bash
# Issue 14 on the GPU machine in one call (carry .whl and .deb; see fetch_deps.sh): arena-mode
# cold start (CS-TTFT through the gateway) for the Qwen3-4B-, Gemma-3-4B- and fp8 Llama-3.1-8B-
# shaped presets beside Llama 8b (the no-regression comparison), then, in the time left, a short
# batching run of qwen3-4b. About 8 minutes; ARCH_LIMIT_S (default 470) bounds the whole script.
# Run: the run tool with carry [".whl", ".deb"], command `bash bench/device/arch_bench.sh`.
# Results: $OUT/arch-coldstart.json, $OUT/arch-batching.json, their logs and the cluster logs.
set -uo pipefail
. "$(dirname "$0")/env.sh"
limit=${ARCH_LIMIT_S:-470}
models=/tmp/snapwake-models
lib=/usr/local/nvidia/lib64; [ -e $lib/libcuda.so.1 ] || lib=""
node=(--seccomp-profile /opt/debs/usr/share/containers/seccomp.json ${lib:+--driver-lib-dir $lib})
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# qwen3-4b is kept for the batching run (8 GB); the others are deleted after their run (disk).
# SIGINT, so that the cluster's context manager stops etcd and the services before the next step.
timeout -s INT -k 20 $((limit - 100 - SECONDS)) python3 -m bench.coldstart --modes arena --python-path $SITE \
  --runc /opt/debs/usr/sbin/runc --repeats ${ARCH_REPEATS:-3} --models-dir $models --out "$OUT/arch-coldstart.json" --preset qwen3-4b \
  --keep-models "${node[@]}" 2>&1 | tee "$OUT/arch-coldstart.log"
timeout -s INT -k 20 $((limit - 100 - SECONDS)) python3 -m bench.coldstart --modes arena --python-path $SITE \
  --runc /opt/debs/usr/sbin/runc --repeats ${ARCH_REPEATS:-3} --models-dir $models --out "$OUT/arch-coldstart.json" --preset gemma3-4b \
  --preset 8b-fp8 --preset 8b "${node[@]}" 2>&1 | tee -a "$OUT/arch-coldstart.log"
rc=${PIPESTATUS[0]}
for d in /tmp/snapwake-bench/*/logs; do [ -d "$d" ] && tar czf "$OUT/logs-$(basename "$(dirname "$d")").tgz" -C "$d" . ; done
find /tmp/snapwake-bench -name output.log -path '*instances*' | head -8 | xargs -r tail -n 30 > "$OUT/instance-logs.txt" 2>/dev/null
left=$((limit - SECONDS))
if [ $left -gt 60 ] && [ -z "${ARCH_SKIP_BATCHING:-}" ]; then
  timeout -s INT -k 10 $((left - 5)) python3 -m bench.batching --presets qwen3-4b --modes graphs --concurrency 1,8,32 \
    --requests 32 --max-tokens 32 --models-dir $models --out "$OUT/arch-batching.json" 2>&1 | tee "$OUT/arch-batching.log"
else
  echo "batching skipped: ${left}s left" | tee "$OUT/arch-batching.log"
fi
echo "wall ${SECONDS}s" | tee -a "$OUT/arch-coldstart.log"
exit $rc
