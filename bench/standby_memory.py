"""A hot standby's host memory, before and after the driver checkpoint, with today's release and the
trimmed one side by side (issue 13, target 3).

A standby is the built-in model server in arena mode: started with ``--start-mode standby``, it
attaches the snapshot the blobstore hands over, runs the sample request, releases the weights
and KV, and waits; the nodeagent then checkpoints it with the CUDA driver (device memory moves
into the process's host memory). This bench runs that model server exactly as the nodeagent
starts it (``services.nodeagent.bundle.modelserver_args``; no container), with a handover
double (``Handover``) in place of the blobstore, and the nodeagent's own ``CudaCheckpointer``:

1. a seeded ``small`` model (bench/models.py) is written; a model server in ``snapshot`` mode
   loads it, answers the reference request (greedy, streamed) and stores its arena with the
   handover double, which imports the exported memory (so it outlives that process);
2. per variant (``old``: ``--standby-trim false``, today's release; ``new``: the default) and
   round, a standby starts, reaches ``released``, and is measured (``/proc/PID/smaps_rollup``:
   Rss, Pss, Pss_Anon, Pss_File, SwapPss), checkpointed, measured again, restored, attached and
   asked the reference request: restore, attach and first-token times, and whether the text is
   the reference's. Then it is released and checkpointed once more (a standby parked again after
   serving), and measured;
3. optionally, a cold-standby probe on a checkpointed ``new`` standby: a swap file
   (``swapon``) and ``process_madvise(MADV_PAGEOUT)`` over its memory, measured, then its
   restore time (the read-back). Refusals are recorded, not fatal;
4. optionally, several ``new`` standbys checkpointed at once (file-backed pages are shared
   between them, so their PSS is what a node with many standbys sees).

Everything goes to one JSON file, rewritten after every step, so a run cut short still reports
what it measured.

    python -m bench.standby_memory --out bench/results/standby-memory-h100.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

SMAPS_KEYS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Private_Dirty", "Swap", "SwapPss")
PROMPT = "The quick brown fox"
MAX_TOKENS = 16
SID = "default/default/standby-memory@1"
MADV_PAGEOUT = 21
SYS_PIDFD_OPEN = 434
SYS_PROCESS_MADVISE = 440
# The reference request's reply on the model server that made the snapshot (set by ``main``).
REFERENCE: dict[str, Any] = {}


def parse_smaps_rollup(text: str) -> dict[str, int]:
    """The ``SMAPS_KEYS`` of a ``smaps_rollup`` text, in KiB (absent keys: 0)."""
    out = dict.fromkeys(SMAPS_KEYS, 0)
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in out and rest.split():
            out[key] = int(rest.split()[0])
    return out


def smaps_mib(pid: int) -> dict[str, float]:
    """``/proc/PID/smaps_rollup`` in MiB, with ``Pss_total`` = Pss + SwapPss (the issue's measure)."""
    kib = parse_smaps_rollup(Path(f"/proc/{pid}/smaps_rollup").read_text())
    out = {k: round(v / 1024, 1) for k, v in kib.items()}
    out["Pss_total"] = round((kib["Pss"] + kib["SwapPss"]) / 1024, 1)
    return out


def private_ranges(maps: str) -> list[tuple[int, int]]:
    """(start, length) of every accessible private mapping in a ``/proc/PID/maps`` text, the
    kernel's special ones ([vvar], [vdso], [vsyscall]) left out: what ``MADV_PAGEOUT`` may page
    out."""
    out = []
    for line in maps.splitlines():
        parts = line.split()
        if len(parts) < 2 or not parts[1].endswith("p") or parts[1].startswith("---"):
            continue
        name = parts[5] if len(parts) > 5 else ""
        if name in ("[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]"):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        out.append((start, end - start))
    return out


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


class Handover:
    """The blobstore's side of the handover socket for one snapshot: ``store`` imports the
    exported arena into this process (so it outlives the model server that made it; a memfd on
    CPU needs nothing) and keeps the fd; ``load`` hands a duplicate back."""

    def __init__(self, path: str, gpu: bool) -> None:
        from snapwake.cuda import check, driver

        self.gpu = gpu
        if gpu:
            cu = driver()
            check(cu.cuInit(0), "cuInit")
            dev = check(cu.cuDeviceGet(0), "cuDeviceGet")
            self._ctx = check(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
            check(cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")  # the main thread's cuMemGetInfo
        self.path = path
        self.snapshots: dict[str, tuple[dict[str, Any], int, Any]] = {}
        self.log: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._sock.bind(path)
        self._sock.listen()
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(60)
                try:
                    self._one(conn)
                except Exception as exc:  # noqa: BLE001 - logged for the results; the peer sees EOF
                    self.log.append(f"handover error: {exc!r}")

    def _one(self, conn: socket.socket) -> None:
        from snapwake.cuda import check, driver
        from snapwake.protocols import recv_message, send_message

        msg, fds = recv_message(conn)
        sid = str(msg.get("snapshot_id"))
        self.log.append(f"{msg.get('op')} {sid}")
        if msg.get("op") == "store":
            handle = None
            if self.gpu:
                cu = driver()
                check(cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
                handle = check(cu.cuMemImportFromShareableHandle(
                    fds[0], cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
                    "cuMemImportFromShareableHandle")
            self.snapshots[sid] = (msg["manifest"], fds[0], handle)
            send_message(conn, {"ok": True, "bytes": int(msg["manifest"]["arena_bytes"]), "manifest_digest": "bench"})
        elif msg.get("op") == "load" and sid in self.snapshots:
            manifest, fd, _ = self.snapshots[sid]
            size = int(manifest["arena_bytes"])
            send_message(conn, {"ok": True, "bytes": size, "alloc_bytes": size, "manifest": manifest,
                                "dma_seconds": 0.0}, fds=[os.dup(fd)])
            recv_message(conn)  # "mapped"
        else:
            for fd in fds:
                os.close(fd)
            send_message(conn, {"ok": False, "error": f"unknown snapshot {sid}"})

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


class Server:
    """One model server process, started as the nodeagent starts it."""

    def __init__(self, name: str, work: Path, model: Path, handover: str, mode: str, slice_bytes: int,
                 trim: bool | None = None, port: int = 0, device: str = "cuda") -> None:
        from services.nodeagent.bundle import modelserver_args
        from snapwake.testing import free_port

        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.control = str(work / f"{name}.ctl")
        self.log_path = work / f"{name}.log"
        self.gpu = 0 if device == "cuda" else -1
        args = list(modelserver_args(sys.executable, model_dir=str(model), port=self.port, device=device, gpu_index=0,
                                     gpu_memory_bytes=slice_bytes, start_mode=mode, control_socket=self.control,
                                     handover_socket=handover, snapshot_id=SID if mode == "standby" else ""))
        if trim is not None:
            args += ["--standby-trim", "true" if trim else "false"]
        self.args = args
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.proc = subprocess.Popen(args, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, env=env)
        self.pid = self.proc.pid

    def control_op(self, msg: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        from snapwake.protocols import request

        reply = asyncio.run(request(self.control, msg, timeout))
        if not reply.get("ok"):
            raise RuntimeError(f"{self.name}: control {msg.get('op')}: {reply}")
        return reply

    def phase(self) -> str | None:
        from snapwake.protocols import request

        try:
            return str(asyncio.run(request(self.control, {"op": "status"}, 5)).get("phase"))
        except Exception:  # noqa: BLE001 - not listening yet
            return None

    def wait_phase(self, want: str, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); log tail:\n{self.tail()}")
            if self.phase() == want:
                return time.monotonic() - t0
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not reach {want} within {timeout:.0f}s; log tail:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def completion(url: str, timeout: float = 120) -> dict[str, Any]:
    """The reference request, streamed: first-token seconds, total seconds and the text."""
    import httpx

    body = {"model": "m", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    t0 = time.monotonic()
    ttft = None
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:500]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            piece = "".join(c.get("text") or "" for c in chunk.get("choices") or [])
            if piece and ttft is None:
                ttft = time.monotonic() - t0
            text += piece
    return {"ttft_s": round(ttft, 4) if ttft is not None else None, "total_s": round(time.monotonic() - t0, 4),
            "text": text}


class Device:
    """The GPU's used memory as the bench's own context sees it, and the nodeagent's driver
    checkpointer (no-ops on CPU, where the bench runs as a smoke test)."""

    def __init__(self, device: str) -> None:
        from services.nodeagent.gpu.checkpoint import CudaCheckpointer, NoGpuCheckpointer

        self.name = device
        self.gpu = device == "cuda"
        self.ck = CudaCheckpointer() if self.gpu else NoGpuCheckpointer()

    def used_mib(self) -> float:
        from snapwake.cuda import check, driver

        if not self.gpu:
            return 0.0
        free, total = check(driver().cuMemGetInfo(), "cuMemGetInfo")
        return round((int(total) - int(free)) / 2**20, 1)

    def checkpoint(self, pid: int) -> float:
        return round(asyncio.run(self.ck.checkpoint(pid)), 4)

    def restore(self, pid: int) -> float:
        return round(asyncio.run(self.ck.restore(pid)), 4)


def nvidia_smi_mib(pid: int) -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            return float(parts[1])
    return None


def park(dev: Device, srv: Server) -> dict[str, Any]:
    """Measures a released standby, checkpoints it, measures again."""
    out: dict[str, Any] = {}
    time.sleep(0.5)
    out["released"] = smaps_mib(srv.pid)
    out["device_mib_nvidia_smi"] = nvidia_smi_mib(srv.pid)
    used = dev.used_mib()
    out["checkpoint_s"] = dev.checkpoint(srv.pid)
    out["device_mib_checkpointed"] = round(used - dev.used_mib(), 1)  # what the checkpoint took off the GPU
    time.sleep(0.5)
    out["checkpointed"] = smaps_mib(srv.pid)
    return out


def wake(dev: Device, srv: Server, reference: str) -> dict[str, Any]:
    """Driver restore, attach, the reference request: times and correctness."""
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    out["restore_s"] = dev.restore(srv.pid)
    t1 = time.monotonic()
    attach = srv.control_op({"op": "attach", "snapshot_id": SID, "gpu": srv.gpu})
    out["attach_s"] = round(time.monotonic() - t1, 4)
    out["attach_reply_s"] = round(float(attach.get("seconds", 0.0)), 4)
    t2 = time.monotonic()
    first = completion(srv.url)
    out["first_request"] = {k: v for k, v in first.items() if k != "text"}
    out["restore_to_first_token_s"] = round(t2 - t0 + (first["ttft_s"] or first["total_s"]), 4)
    out["identical_output"] = first["text"] == reference
    if not out["identical_output"]:
        out["text"] = first["text"]
    second = completion(srv.url)
    out["second_request"] = {k: v for k, v in second.items() if k != "text"}
    out["identical_output"] = out["identical_output"] and second["text"] == reference
    out["serving"] = smaps_mib(srv.pid)
    return out


def run_standby(dev: Device, work: Path, model: Path, handover: str, slice_bytes: int, variant: str,
                index: int) -> dict[str, Any]:
    """One standby of ``variant`` through park, wake and park again."""
    srv = Server(f"{variant}-{index}", work, model, handover, "standby", slice_bytes, trim=variant == "new",
                 device=dev.name)
    r: dict[str, Any] = {"pid": srv.pid}
    try:
        r["start_to_released_s"] = round(srv.wait_phase("released", 300), 2)
        r["first_park"] = park(dev, srv)
        r["wake"] = wake(dev, srv, REFERENCE["text"])
        t = time.monotonic()
        srv.control_op({"op": "release"})
        r["release_s"] = round(time.monotonic() - t, 4)
        r["second_park"] = park(dev, srv)
        r["second_wake"] = wake(dev, srv, REFERENCE["text"])
    except Exception as exc:  # noqa: BLE001 - recorded; the next standby still runs
        r["error"] = repr(exc)[:3000]
        r["log_tail"] = srv.tail()
        with contextlib.suppress(Exception):  # a checkpointed process must be restored before it can exit
            dev.restore(srv.pid)
    finally:
        srv.stop()
    return r


def cold_probe(dev: Device, work: Path, model: Path, handover: str, slice_bytes: int,
               swap_mib: int) -> dict[str, Any]:
    """Can a checkpointed standby's memory be paged out (swap file + MADV_PAGEOUT), and what
    does its restore cost then? Every refusal is recorded."""
    out: dict[str, Any] = {}
    swapfile = work / "standby.swap"
    swapped_on = False

    def sh(*cmd: str) -> dict[str, Any]:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            return {"cmd": " ".join(cmd), "rc": p.returncode, "out": (p.stdout + p.stderr).strip()[-500:]}
        except (OSError, subprocess.TimeoutExpired) as exc:
            return {"cmd": " ".join(cmd), "rc": None, "out": repr(exc)}

    out["swaps_before"] = Path("/proc/swaps").read_text()
    out["work_fs"] = sh("df", "-T", str(work))
    steps = [sh("fallocate", "-l", f"{swap_mib}M", str(swapfile))]
    if steps[-1]["rc"] != 0:
        steps.append(sh("dd", "if=/dev/zero", f"of={swapfile}", "bs=1M", f"count={swap_mib}"))
    steps.append(sh("chmod", "600", str(swapfile)))
    steps.append(sh("mkswap", str(swapfile)))
    steps.append(sh("swapon", str(swapfile)))
    swapped_on = steps[-1]["rc"] == 0
    out["swap_steps"] = steps
    out["swap_file_on"] = swapped_on
    out["swaps_after"] = Path("/proc/swaps").read_text()
    srv = Server("cold", work, model, handover, "standby", slice_bytes, trim=True, device=dev.name)
    try:
        srv.wait_phase("released", 300)
        out["park"] = park(dev, srv)
        out["pageout"] = pageout(srv.pid)
        time.sleep(1.0)
        out["paged_out"] = smaps_mib(srv.pid)
        out["wake"] = wake(dev, srv, REFERENCE["text"])
    except Exception as exc:  # noqa: BLE001
        out["error"] = repr(exc)[:3000]
        out["log_tail"] = srv.tail()
        with contextlib.suppress(Exception):
            dev.restore(srv.pid)
    finally:
        srv.stop()
        if swapped_on:
            out["swapoff"] = sh("swapoff", str(swapfile))
        with contextlib.suppress(OSError):
            swapfile.unlink()
    return out


def pageout(pid: int) -> dict[str, Any]:
    """``process_madvise(pidfd, ranges, MADV_PAGEOUT)`` over every private mapping of ``pid``."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    pidfd = libc.syscall(SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0))
    if pidfd < 0:
        return {"ok": False, "error": f"pidfd_open: {os.strerror(ctypes.get_errno())}"}

    class Iovec(ctypes.Structure):
        _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]

    ranges = private_ranges(Path(f"/proc/{pid}/maps").read_text())
    advised = 0
    errors: dict[str, int] = {}
    t0 = time.monotonic()
    try:
        # One range a call: the kernel stops a call at its first range it refuses (locked or
        # device mappings), so the rest would go unadvised.
        for start, length in ranges:
            iov = Iovec(start, length)
            n = libc.syscall(SYS_PROCESS_MADVISE, ctypes.c_int(pidfd), ctypes.byref(iov), ctypes.c_size_t(1),
                             ctypes.c_int(MADV_PAGEOUT), ctypes.c_uint(0))
            if n < 0:
                why = os.strerror(ctypes.get_errno())
                errors[why] = errors.get(why, 0) + 1
            else:
                advised += n
    finally:
        os.close(pidfd)
    return {"ok": advised > 0, "ranges": len(ranges), "bytes_advised_mib": round(advised / 2**20, 1),
            "errors": errors, "seconds": round(time.monotonic() - t0, 3)}


FLOOR_CHILD = r"""
import sys
from cuda.bindings import driver as cu
if sys.argv[1] == "torch":
    import torch
    torch.ones(1 << 20, device="cuda").sum().item()
else:
    cu.cuInit(0); _, d = cu.cuDeviceGet(0); _, c = cu.cuDevicePrimaryCtxRetain(d); cu.cuCtxSetCurrent(c)
    cu.cuMemAlloc(1 << 20)
if sys.argv[2] != "default":
    print("set", cu.cuCtxSetLimit(cu.CUlimit.CU_LIMIT_STACK_SIZE, int(sys.argv[2])), file=sys.stderr)
print("ready", cu.cuCtxGetLimit(cu.CUlimit.CU_LIMIT_STACK_SIZE)[1], flush=True)
sys.stdin.readline()
"""


def floor_probe(dev: Device, work: Path) -> dict[str, Any]:
    """The floor under a standby: a process with only a CUDA context (or torch and one tensor),
    with the driver's default stack and with it at 0, checkpointed."""
    out: dict[str, Any] = {}
    for what in ("context", "torch"):
        for stack in ("default", "0"):
            name = f"{what}_stack_{stack}"
            err = work / f"floor-{name}.err"
            p = subprocess.Popen([sys.executable, "-c", FLOOR_CHILD, what, stack], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=open(err, "w"), text=True)
            r: dict[str, Any] = {}
            try:
                line = p.stdout.readline().strip() if p.stdout else ""
                if not line.startswith("ready"):
                    p.kill()
                    p.wait(10)
                    raise RuntimeError(f"child: {line!r} {err.read_text(errors='replace')[-800:]}")
                r["stack_bytes"] = int(line.split()[1])
                time.sleep(0.3)
                r["before"] = smaps_mib(p.pid)
                used = dev.used_mib()
                r["checkpoint_s"] = dev.checkpoint(p.pid)
                r["device_mib_checkpointed"] = round(used - dev.used_mib(), 1)
                time.sleep(0.3)
                r["checkpointed"] = smaps_mib(p.pid)
                r["restore_s"] = dev.restore(p.pid)
            except Exception as exc:  # noqa: BLE001 - recorded
                r["error"] = repr(exc)[:1500]
                with contextlib.suppress(Exception):
                    dev.restore(p.pid)
            finally:
                with contextlib.suppress(Exception):
                    if p.stdin:
                        p.stdin.write("\n")
                        p.stdin.flush()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
            out[name] = r
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "kernel": platform.release()}
    with contextlib.suppress(Exception):
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                      "--format=csv,noheader"], capture_output=True, text=True,
                                     timeout=30).stdout.strip()
    with contextlib.suppress(Exception):
        import torch

        info["torch"] = torch.__version__
    info["CUDA_MODULE_LOADING"] = os.environ.get("CUDA_MODULE_LOADING", "(unset; torch sets LAZY)")
    with contextlib.suppress(Exception):
        info["meminfo"] = {line.split(":")[0]: line.split(":")[1].strip()
                           for line in Path("/proc/meminfo").read_text().splitlines()[:6]}
    return info


def summarize(results: dict[str, Any]) -> None:
    """Medians per variant and stage, and the verdict against the 800 MB target."""
    summary: dict[str, Any] = {}
    for variant, runs in results["standbys"].items():
        ok = [r for r in runs if "first_park" in r]
        s: dict[str, Any] = {"standbys": len(runs), "measured": len(ok)}
        for park_key in ("first_park", "second_park"):
            for stage in ("released", "checkpointed"):
                for key in ("Pss_total", "Pss_Anon", "Pss_File", "SwapPss", "Rss"):
                    vals = [r[park_key][stage][key] for r in ok if park_key in r]
                    s[f"{park_key}.{stage}.{key}_mib"] = median(vals)
            s[f"{park_key}.device_mib_checkpointed"] = median(
                [r[park_key]["device_mib_checkpointed"] for r in ok if park_key in r])
            s[f"{park_key}.checkpoint_s"] = median([r[park_key]["checkpoint_s"] for r in ok if park_key in r])
        for wake_key in ("wake", "second_wake"):
            woke = [r[wake_key] for r in ok if wake_key in r]
            for key in ("restore_s", "attach_s", "restore_to_first_token_s"):
                s[f"{wake_key}.{key}"] = median([w[key] for w in woke])
            s[f"{wake_key}.identical_output"] = bool(woke) and all(w["identical_output"] for w in woke)
        pss = s.get("first_park.checkpointed.Pss_total_mib")
        s["hot_standby_pss_mb"] = round(pss * 1.048576, 1) if pss is not None else None
        s["meets_800_mb"] = pss is not None and pss * 1.048576 <= 800
        summary[variant] = s
    if "old" in summary and "new" in summary:  # new minus old, where both were measured
        summary["new_minus_old"] = {k: round(v - summary["old"][k], 4) for k, v in summary["new"].items()
                                    if isinstance(v, float) and isinstance(summary["old"].get(k), float)}
    results["summary"] = summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/standby-memory-h100.json"))
    p.add_argument("--work", type=Path, default=Path("/tmp/snapwake-standby"))
    p.add_argument("--preset", default="small")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke test of the flow")
    p.add_argument("--tiny", action="store_true", help="the preset at tiny dims (bench.models.TINY)")
    p.add_argument("--slice-gib", type=float, default=4.0, help="the standby's GPU slice")
    p.add_argument("--rounds", type=int, default=2, help="standbys per variant (old and new alternate)")
    p.add_argument("--concurrent", type=int, default=4, help="new standbys checkpointed at once (0: skip)")
    p.add_argument("--cold-probe", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--swap-mib", type=int, default=4096)
    p.add_argument("--budget-s", type=float, default=330, help="optional phases are skipped past this")
    opts = p.parse_args(argv)

    from bench.models import TINY, describe, make_random_model

    t_start = time.monotonic()
    opts.work.mkdir(parents=True, exist_ok=True)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    slice_bytes = int(opts.slice_gib * 2**30)
    results: dict[str, Any] = {"bench": "bench/standby_memory.py", "preset": opts.preset, "machine": machine(),
                               "slice_bytes": slice_bytes, "variants": {
                                   "old": "--standby-trim false: today's release (cuBLAS workspaces, gc, "
                                          "empty_cache)",
                                   "new": "--standby-trim true: also the context's per-thread stack to 0, "
                                          "torch's pinned host cache, malloc_trim(0)"},
                               "standbys": {"old": [], "new": []}}

    def save() -> None:
        results["elapsed_s"] = round(time.monotonic() - t_start, 1)
        with contextlib.suppress(Exception):
            summarize(results)
        opts.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"[{results['elapsed_s']:.0f}s] saved {opts.out}", flush=True)

    def left() -> float:
        return opts.budget_s - (time.monotonic() - t_start)

    model = make_random_model(opts.work / "models" / opts.preset, opts.preset, device=opts.device,
                              overrides=TINY if opts.tiny else None)
    results["model"] = describe(model)
    handover = Handover(str(opts.work / "handover.sock"), opts.device == "cuda")
    dev = Device(opts.device)
    results["device_mib_used_at_start"] = dev.used_mib()
    if dev.gpu:
        try:
            results["floor"] = floor_probe(dev, opts.work)
        except Exception as exc:  # noqa: BLE001 - the standbys are what matters
            results["floor"] = {"error": repr(exc)[:1500]}
        print("floor:", json.dumps(results["floor"])[:2000], flush=True)
        save()
    src = Server("source", opts.work, model, handover.path, "snapshot", slice_bytes, device=opts.device)
    try:
        results["source_start_s"] = round(src.wait_phase("serving", 300), 2)
        REFERENCE.update(completion(src.url))
        results["reference"] = dict(REFERENCE)
        results["source_serving"] = smaps_mib(src.pid)
        src.control_op({"op": "snapshot", "snapshot_id": SID})
    except Exception as exc:
        results["error"] = f"source: {exc!r}"[:3000]
        results["source_log_tail"] = src.tail()
        save()
        raise
    finally:
        src.stop()
    save()
    print("reference:", REFERENCE, flush=True)

    for i in range(opts.rounds):
        for variant in ("old", "new"):
            if i and left() < 60:
                results.setdefault("skipped", []).append(f"round {i} {variant}: budget")
                continue
            r = run_standby(dev, opts.work, model, handover.path, slice_bytes, variant, i)
            results["standbys"][variant].append(r)
            print(variant, i, json.dumps({k: r.get(k) for k in ("first_park", "wake", "error")})[:1500], flush=True)
            save()

    if opts.cold_probe and left() > 60:
        results["cold_probe"] = cold_probe(dev, opts.work, model, handover.path, slice_bytes, opts.swap_mib)
        print("cold probe:", json.dumps(results["cold_probe"])[:2000], flush=True)
        save()
    elif opts.cold_probe:
        results.setdefault("skipped", []).append("cold probe: budget")

    if opts.concurrent and left() > 90:
        results["concurrent"] = concurrent(dev, opts.work, model, handover.path, slice_bytes, opts.concurrent)
        print("concurrent:", json.dumps(results["concurrent"].get("median_mib"))[:1500], flush=True)
        save()
    elif opts.concurrent:
        results.setdefault("skipped", []).append("concurrent: budget")

    results["handover_log"] = handover.log[-20:]
    handover.close()
    save()


def concurrent(dev: Device, work: Path, model: Path, handover: str, slice_bytes: int, n: int) -> dict[str, Any]:
    """``n`` new standbys parked at once: their file-backed pages are shared, so each one's PSS
    is what a node with many standbys pays."""
    from snapwake.testing import free_ports

    servers = [Server(f"many-{i}", work, model, handover, "standby", slice_bytes, trim=True, port=port,
                      device=dev.name) for i, port in enumerate(free_ports(n))]
    out: dict[str, Any] = {"n": n, "checkpointed": []}
    parked: list[Server] = []
    try:
        for srv in servers:
            srv.wait_phase("released", 300)
        for srv in servers:
            dev.checkpoint(srv.pid)
            parked.append(srv)
        time.sleep(1.0)
        out["checkpointed"] = [smaps_mib(srv.pid) for srv in servers]
        out["median_mib"] = {k: median([m[k] for m in out["checkpointed"]])
                             for k in ("Pss_total", "Pss_Anon", "Pss_File", "SwapPss", "Rss")}
        woke = []
        for srv in parked:
            woke.append(wake(dev, srv, REFERENCE["text"]))
        parked = []
        out["identical_output"] = all(w["identical_output"] for w in woke)
        out["restore_s"] = [w["restore_s"] for w in woke]
    except Exception as exc:  # noqa: BLE001
        out["error"] = repr(exc)[:3000]
        out["log_tails"] = {srv.name: srv.tail(1500) for srv in servers}
    finally:
        for srv in parked:
            with contextlib.suppress(Exception):
                dev.restore(srv.pid)
        for srv in servers:
            srv.stop()
    return out


if __name__ == "__main__":
    main()
