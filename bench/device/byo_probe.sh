#!/usr/bin/env bash
# What building a user image from the GPU machine's own Python needs to know (one short call):
# the OS, where python3 and its packages live and their sizes, whether the carried skopeo/umoci
# run, whether transformers serve starts, what NVML reports as a process's pid, and what the
# driver's checkpoint state query answers for a process without CUDA. Log: $OUT/byo-probe.log
set -x
. "$(dirname "$0")/env.sh"
exec > >(tee "$OUT/byo-probe.log") 2>&1
head -3 /etc/os-release; uname -a; nproc; free -g; df -h / /tmp /opt
command -v python3; readlink -f "$(command -v python3)"
python3 -c 'import sys; print(sys.prefix, sys.base_prefix, sys.version)'
cat /opt/torch/.venv/pyvenv.cfg; ls -la /opt/torch/.venv/bin | head -20
du -sh /usr /usr/local /usr/lib /usr/share /opt/torch/.venv /usr/local/cuda* 2>/dev/null
du -sh /opt/torch/.venv/lib/python3.12/site-packages/* 2>/dev/null | sort -h | tail -45
ldd "$(readlink -f "$(command -v python3)")"
ls /usr/lib/python3.12 | head -5; du -sh /usr/lib/python3.12
L=/opt/debs/usr/lib/x86_64-linux-gnu:/opt/debs/lib/x86_64-linux-gnu
LD_LIBRARY_PATH=$L skopeo --version; LD_LIBRARY_PATH=$L ldd /opt/debs/usr/bin/skopeo | grep "not found"; umoci --version
PYTHONPATH=$SITE python3 -c 'import fastapi, transformers; print(fastapi.__version__, transformers.__version__)'
python3 -c 'import transformers; print(transformers.__version__, transformers.__file__)'
timeout 60 env PYTHONPATH=/tmp/fa python3 -m pip install -q --no-index --no-deps --target /tmp/fa .whl/fastapi-*.whl .whl/starlette-*.whl .whl/uvicorn-*.whl .whl/openai-*.whl .whl/jiter-*.whl .whl/distro-*.whl .whl/sniffio-*.whl
PYTHONPATH=/tmp/fa timeout 60 transformers serve --help 2>&1 | head -40 || PYTHONPATH=/tmp/fa timeout 60 python3 -m transformers.cli.transformers serve --help | head -40
cat > /tmp/nvml_probe.py <<'PY'
import os, subprocess, sys, time
import pynvml
from cuda.bindings import driver as cu
child = subprocess.Popen([sys.executable, "-c", "import torch,time; x=torch.ones(1<<28, device='cuda'); print('child ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
print(child.stdout.readline().strip(), "child pid", child.pid)
sleeper = subprocess.Popen(["sleep", "60"])
pynvml.nvmlInit(); h = pynvml.nvmlDeviceGetHandleByIndex(0)
print("nvml procs", [(p.pid, p.usedGpuMemory) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)])
print("nvml mem", pynvml.nvmlDeviceGetMemoryInfo(h).used)
print("nspid", [l for l in open(f"/proc/{child.pid}/status") if l.startswith("NSpid")])
print(cu.cuInit(0))
print("state of sleeper", cu.cuCheckpointProcessGetState(sleeper.pid))
print("state of child", cu.cuCheckpointProcessGetState(child.pid))
print("state of nonexistent", cu.cuCheckpointProcessGetState(999999))
print("fds", sorted({os.readlink(f"/proc/{child.pid}/fd/{f}") for f in os.listdir(f"/proc/{child.pid}/fd")}))
child.kill(); sleeper.kill()
PY
python3 /tmp/nvml_probe.py
