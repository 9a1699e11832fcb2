"""Where a standby's host memory goes: RSS of a torch process at each step, and after the driver
checkpoint. Run on the GPU machine: python3 bench/device/rss_probe.py"""

from __future__ import annotations

import json
import subprocess
import sys
import time

CHILD = r"""
import sys, json
def rss():
    for l in open('/proc/self/status'):
        if l.startswith('VmRSS'): return int(l.split()[1]) // 1024
out = {'python': rss()}
import torch; out['import torch'] = rss()
import transformers; from transformers import LlamaForCausalLM; out['import transformers'] = rss()
torch.zeros(1, device='cuda'); torch.cuda.synchronize(); out['cuda context'] = rss()
a = torch.randn(1024, 1024, device='cuda', dtype=torch.bfloat16); (a @ a).sum().item(); out['cublas matmul'] = rss()
torch.nn.functional.scaled_dot_product_attention(a.view(1, 1, 1024, 1024), a.view(1, 1, 1024, 1024), a.view(1, 1, 1024, 1024)).sum().item()
torch.nn.functional.silu(a).sum().item(); torch.softmax(a.float(), -1).sum().item(); out['sdpa+misc kernels'] = rss()
del a; torch._C._cuda_clearCublasWorkspaces(); torch.cuda.empty_cache(); out['released'] = rss()
out['torch reserved MiB'] = torch.cuda.memory_reserved() >> 20
print(json.dumps(out), flush=True)
sys.stdin.readline()
out2 = {'after restore': rss()}
print(json.dumps(out2), flush=True)
sys.stdin.readline()
"""


def proc_rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return 0


def gpu_mib(pid: int) -> int:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return sum(int(m) for p, m in (line.split(",") for line in out.strip().splitlines()) if int(p) == pid)


def main() -> None:
    from cuda.bindings import driver as cu

    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    steps = json.loads(p.stdout.readline())
    steps["device MiB before checkpoint"] = gpu_mib(p.pid)
    cu.cuInit(0)
    la = cu.CUcheckpointLockArgs()
    la.timeoutMs = 10000
    cu.cuCheckpointProcessLock(p.pid, la)
    t = time.time()
    cu.cuCheckpointProcessCheckpoint(p.pid, cu.CUcheckpointCheckpointArgs())
    steps["checkpoint s"] = round(time.time() - t, 3)
    steps["after checkpoint (RSS MiB)"] = proc_rss(p.pid)
    steps["device MiB after checkpoint"] = gpu_mib(p.pid)
    t = time.time()
    cu.cuCheckpointProcessRestore(p.pid, cu.CUcheckpointRestoreArgs())
    cu.cuCheckpointProcessUnlock(p.pid, cu.CUcheckpointUnlockArgs())
    steps["restore s"] = round(time.time() - t, 3)
    p.stdin.write("\n")
    p.stdin.flush()
    steps.update(json.loads(p.stdout.readline()))
    p.stdin.write("\n")
    p.stdin.flush()
    p.wait(30)
    print(json.dumps(steps, indent=1))


if __name__ == "__main__":
    main()
