"""``bench/disk_start_e2e``: CS-TTFT through the gateway when the snapshot is not in the host cache.

The 8B bench model (or ``--preset``) deployed in arena mode on the whole platform (etcd,
scheduler, nodeagent with runc, blobstore, gateway), as in ``bench/coldstart`` (c). Each round,
side by side in one run:
  - ``cached``: a request to the gateway with the function's only instance a zero-GPU standby
    and the snapshot in the blobstore's host cache (today's path), timed to the first token;
  - ``disk``: the same after the blobstore was restarted, so its host cache is empty and the
    restore's load streams the snapshot from disk (services/blobstore/stream.py).
The blobstore's own log line for each load from disk (bytes, seconds, GB/s) is kept beside it.

    python -m bench.disk_start_e2e --preset 8b --python-path SITE --runc RUNC --out OUT.json \\
        --seccomp-profile ... --driver-lib-dir ...   # unknown flags go to the nodeagent
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.coldstart import first_token, machine
from bench.coldstart_arena import _spec, _wait
from bench.models import describe, make_random_model
from snapwake.devcluster import Cluster, ClusterConfig
from snapwake.lifecycle import SERVING
from snapwake.pki import Identity
from snapwake.v1 import nodeagent_pb2, nodeagent_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2
from snapwake.v1.types_pb2 import InstanceState

GIB = 1 << 30
_FROM_DISK = re.compile(r"loaded (\S+) from disk into gpu \d+: (\d+) bytes in ([0-9.]+) s \(([0-9.]+) GB/s\), (.*)")


def _log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def from_disk_lines(log: Path) -> list[dict[str, Any]]:
    out = []
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            if (m := _FROM_DISK.search(line)) is not None:
                out.append({"snapshot_id": m[1], "bytes": int(m[2]), "seconds": float(m[3]), "gbps": float(m[4]),
                            "how": m[5][:120]})
    return out


def run(opts: argparse.Namespace, nodeagent_args: list[str], res: dict[str, Any], save: Any) -> None:
    preset = opts.preset
    t = time.monotonic()
    model = make_random_model(opts.models_dir / preset, preset)
    res["generate_s"] = time.monotonic() - t
    res.update(describe(model))
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    res["model_gb"] = model_bytes / 1e9
    slice_bytes = model_bytes + 6 * GIB
    var = opts.work_dir / preset
    shutil.rmtree(var, ignore_errors=True)
    cfg = ClusterConfig(var_dir=var, gateway_port=0, scheduler_port=0, nodeagent_port=0, blobstore_port=0,
                        etcd_port=0, extra_args={
                            "blobstore": ["--cache-bytes", str(model_bytes + 2 * GIB), "--gpu", "true",
                                          "--chunk-bytes", str(64 << 20), "--staging-buffers", "8",
                                          "--disk-readers", str(opts.disk_readers)],
                            "nodeagent": ["--runc-binary", opts.runc, "--start-timeout", "600",
                                          "--model-roots", str(model.parent),
                                          *(["--python-path", opts.python_path] if opts.python_path else []),
                                          *nodeagent_args]})
    name = f"disk-{preset}"
    fid = f"default/default/{name}"
    blob_log = var / "logs" / "blobstore.log"
    with Cluster(cfg) as c, c.admin_channel() as ch:
        admin = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        t0 = time.monotonic()
        admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=_spec(name, model, slice_bytes)), timeout=30)

        def instances() -> list[types_pb2.Instance]:
            return list(admin.ListInstances(scheduler_pb2.ListInstancesRequest(function_id=fid), timeout=30).instances)

        def settled_standby() -> types_pb2.Instance | None:
            inst = instances()
            f = admin.GetFunction(scheduler_pb2.GetFunctionRequest(function_id=fid), timeout=30).function
            if f.state == types_pb2.FUNCTION_STATE_FAILED:
                raise RuntimeError(f"function failed: {f.status_message}")
            busy = [i for i in inst if i.state in (InstanceState.INSTANCE_STATE_CREATING,
                                                   InstanceState.INSTANCE_STATE_STARTING,
                                                   InstanceState.INSTANCE_STATE_RESTORING)]
            standby = [i for i in inst if i.state == InstanceState.INSTANCE_STATE_STANDBY]
            return standby[0] if standby and not busy else None

        _wait("a settled STANDBY instance", settled_standby, 900)
        res["standby_ready_s"] = time.monotonic() - t0
        _log(f"standby ready after {res['standby_ready_s']:.1f}s")
        snaps = admin.ListSnapshots(scheduler_pb2.ListSnapshotsRequest(function_id=fid), timeout=30).snapshots
        res["snapshot_bytes"] = max((s.total_bytes or s.bytes_written for s in snaps), default=0)
        na = nodeagent_pb2_grpc.NodeAgentServiceStub(c.channel_as("nodeagent", Identity("scheduler", "scheduler")))

        def suspend_served() -> list[float]:
            served = [i for i in instances() if i.state in SERVING]
            for i in served:
                na.SuspendInstance(nodeagent_pb2.SuspendInstanceRequest(instance_id=i.id), timeout=120)
            return [i.last_start_seconds for i in served]

        res["rounds"] = []
        for k in range(opts.repeats):
            rnd: dict[str, Any] = {}
            res["rounds"].append(rnd)
            _wait("a settled STANDBY instance", settled_standby, 300)
            rnd["cached_cs_ttft_s"] = first_token(c.gateway_url, name)
            rnd["cached_restore_s"] = suspend_served()
            _log(f"round {k}: cached CS-TTFT {rnd['cached_cs_ttft_s']:.3f}s")
            save()
            _wait("a settled STANDBY instance", settled_standby, 300)
            before = len(from_disk_lines(blob_log))
            t1 = time.monotonic()
            c.stop_service("blobstore")
            c.start_service("blobstore")  # a new process: its host cache is empty
            rnd["blobstore_restart_s"] = time.monotonic() - t1
            time.sleep(2.0)  # the nodeagent's channel finds the new process
            _wait("a settled STANDBY instance", settled_standby, 120)
            rnd["disk_cs_ttft_s"] = first_token(c.gateway_url, name)
            rnd["disk_restore_s"] = suspend_served()
            rnd["blobstore_loads_from_disk"] = from_disk_lines(blob_log)[before:]
            _log(f"round {k}: disk CS-TTFT {rnd['disk_cs_ttft_s']:.3f}s, blobstore: {rnd['blobstore_loads_from_disk']}")
            save()
    for key in ("cached_cs_ttft_s", "disk_cs_ttft_s"):
        vals = [r[key] for r in res["rounds"] if key in r]
        if vals:
            res[f"{key}_median"] = statistics.median(vals)
    loads = [d for r in res["rounds"] for d in r.get("blobstore_loads_from_disk", [])]
    if loads:
        res["disk_load_gbps_median"] = statistics.median(d["gbps"] for d in loads)
    shutil.rmtree(model, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="8b")
    p.add_argument("--models-dir", type=Path, default=Path("/tmp/snapwake-models"))
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/snapwake-bench"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--disk-readers", type=int, default=8)
    p.add_argument("--python-path", default="")
    p.add_argument("--runc", default="runc")
    p.add_argument("--out", type=Path, required=True)
    opts, nodeagent_args = p.parse_known_args(argv)
    res: dict[str, Any] = {"benchmark": "disk_start_e2e", "machine": machine(), "preset": opts.preset}

    def save() -> None:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    try:
        run(opts, nodeagent_args, res, save)
    except Exception as exc:  # noqa: BLE001 - what was measured stays in the file
        res["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        save()
        return 1
    save()
    print(json.dumps({k: v for k, v in res.items() if k.endswith("_median")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
