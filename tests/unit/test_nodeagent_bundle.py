"""OCI bundle generation: mounts, namespaces, the model server command line, and the container spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.nodeagent.bundle import BundleSpec, Device, build_config, modelserver_args, write_bundle
from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.container import bundle_spec, control_socket, work_dir
from services.nodeagent.machine import StartPlan
from snapwake.v1 import nodeagent_pb2, types_pb2


def _spec(**kw: object) -> BundleSpec:
    base: dict[str, object] = dict(args=("/py", "-m", "modelserver"), env={"A": "1"}, cwd="/state/i-1",
                                   hostname="i-1", ro_binds=("/usr", "/etc", "/work/repo", "/work/repo/.venv"),
                                   rw_binds=("/state/i-1",), symlinks=(("bin", "usr/bin"),))
    base.update(kw)
    return BundleSpec(**base)  # type: ignore[arg-type]


def _mount(cfg: dict, dest: str) -> dict:
    return next(m for m in cfg["mounts"] if m["destination"] == dest)


@pytest.mark.parametrize(("dest", "kind", "option"), [
    ("/usr", "bind", "ro"),
    ("/etc", "bind", "ro"),
    ("/work/repo", "bind", "ro"),
    ("/state/i-1", "bind", "rw"),
    ("/proc", "proc", None),
    ("/tmp", "tmpfs", "mode=1777"),
    ("/dev", "tmpfs", "mode=755"),
    ("/dev/shm", "tmpfs", "mode=1777"),
])
def test_cpu_mounts(dest: str, kind: str, option: str | None) -> None:
    mount = _mount(build_config(_spec()), dest)
    assert mount["type"] == kind
    if option:
        assert option in mount["options"]


def test_nested_read_only_bind_is_folded_into_its_parent() -> None:
    dests = [m["destination"] for m in build_config(_spec())["mounts"]]
    assert "/work/repo/.venv" not in dests
    assert dests.count("/work/repo") == 1


def test_parents_mount_before_children_and_tmpfs_before_binds() -> None:
    cfg = build_config(_spec(rw_binds=("/tmp/sw/i-1",), ro_binds=("/usr", "/tmp/sw")))
    dests = [m["destination"] for m in cfg["mounts"]]
    assert dests.index("/tmp") < dests.index("/tmp/sw") < dests.index("/tmp/sw/i-1")


# This test asserted that a GPU container got the host's whole /dev bound and every device
# allowed; the sandbox replaced that with the GPU's own nodes only (named for what it checks now).
@pytest.mark.parametrize("gpu", [False, True])
def test_gpu_gets_only_its_device_nodes(gpu: bool) -> None:
    nodes = (Device("/dev/nvidia3", 195, 3), Device("/dev/nvidiactl", 195, 255)) if gpu else ()
    cfg = build_config(_spec(devices=nodes))
    assert _mount(cfg, "/dev")["type"] == "tmpfs" and _mount(cfg, "/dev/shm")["type"] == "tmpfs"
    assert not any(m["type"] == "bind" and m["source"].startswith("/dev") for m in cfg["mounts"])
    assert cfg["linux"]["resources"]["devices"] == [
        {"allow": False, "access": "rwm"},
        *({"allow": True, "type": "c", "major": d.major, "minor": d.minor, "access": "rw"} for d in nodes)]
    assert [(d["path"], d["major"], d["minor"]) for d in cfg["linux"]["devices"]] == [
        (d.path, d.major, d.minor) for d in nodes]


def test_namespaces_root_and_process() -> None:
    cfg = build_config(_spec())
    assert sorted(n["type"] for n in cfg["linux"]["namespaces"]) == [
        "cgroup", "ipc", "mount", "network", "pid", "user", "uts"]
    assert cfg["root"] == {"path": "rootfs", "readonly": True}
    assert cfg["process"]["args"] == ["/py", "-m", "modelserver"]
    assert cfg["process"]["env"] == ["A=1"]
    assert cfg["process"]["cwd"] == "/state/i-1" and cfg["hostname"] == "i-1"


def test_write_bundle_makes_rootfs_symlinks(tmp_path: Path) -> None:
    write_bundle(tmp_path / "b", _spec())
    assert (tmp_path / "b" / "rootfs" / "bin").readlink() == Path("usr/bin")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["hostname"] == "i-1"
    write_bundle(tmp_path / "b", _spec())  # idempotent


@pytest.mark.parametrize(("snapshot_id", "sample", "tail"), [
    ("", "", []),
    ("t/n/f@1", "", ["--snapshot-id", "t/n/f@1"]),
    ("t/n/f@1", "{}", ["--snapshot-id", "t/n/f@1", "--sample-request", "{}"]),
])
def test_runtime_args(snapshot_id: str, sample: str, tail: list[str]) -> None:
    args = modelserver_args("/py", model_dir="/m", port=9000, device="cpu", gpu_index=0, gpu_memory_bytes=5,
                        start_mode="load", control_socket="/s/c.sock", handover_socket="/h.sock",
                        snapshot_id=snapshot_id, sample_request=sample)
    assert list(args[:3]) == ["/py", "-m", "modelserver"]
    flags = dict(zip(args[3:21:2], args[4:21:2], strict=True))
    assert flags == {"--model-dir": "/m", "--host": "127.0.0.1", "--port": "9000", "--device": "cpu",
                     "--gpu-index": "0", "--gpu-memory-bytes": "5", "--start-mode": "load",
                     "--control-socket": "/s/c.sock", "--handover-socket": "/h.sock"}
    assert list(args[21:]) == tail


def test_instance_bundle_spec(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    config = NodeAgentConfig(handover_socket=str(tmp_path / "hs" / "h.sock"), state_dir=str(tmp_path / "st"))
    req = nodeagent_pb2.StartInstanceRequest(
        instance_id="i-0123456789ab", function_id="default/default/demo", revision=3,
        spec=types_pb2.FunctionSpec(model_dir=str(model), env={"X": "y"}, sample_request='{"a":1}'))
    idir = tmp_path / "st" / "instances" / "i-0123456789ab"
    spec = bundle_spec(config, req, StartPlan.STANDBY, 9100, idir, gpu=None)
    args = list(spec.args)
    assert args[args.index("--start-mode") + 1] == "standby"
    assert args[args.index("--snapshot-id") + 1] == "default/default/demo@3"
    assert args[args.index("--control-socket") + 1] == str(control_socket(idir)) == str(idir / "work" / "control.sock")
    # The instance's own handover socket, in its own dir (bound read-only, its work dir read-write
    # on top); the node's socket dir is not bound.
    assert spec.env["X"] == "y" and spec.env["SNAPWAKE_HANDOVER_SOCKET"] == str(idir / "handover.sock")
    assert args[args.index("--handover-socket") + 1] == str(idir / "handover.sock")
    assert str(model) in spec.ro_binds and str(tmp_path / "hs") not in spec.ro_binds and str(idir) in spec.ro_binds
    assert spec.rw_binds == (str(work_dir(idir)),) and not spec.gpu
