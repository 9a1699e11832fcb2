"""The instance sandbox's pure parts: the OCI config, seccomp translation, limits, the node's
spec checks, GPU nodes and driver files, a user image's user, root layout and bundle."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from services.nodeagent import cgroups, seccomp, spec_checks
from services.nodeagent.bundle import BundleSpec, Device, IdMap, Limits, build_config, write_bundle
from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.container import (
    MODEL_DIR,
    bundle_spec,
    container_limits,
    image_layout,
    user_image_bundle_spec,
)
from services.nodeagent.gpu import devices
from services.nodeagent.gpu.devices import DRIVER_DIR, NodeGpus
from services.nodeagent.machine import StartPlan
from services.nodeagent.users import ImageUser, parse_group, parse_passwd, read_in_root, resolve_user
from snapwake import errors
from snapwake.envkeys import forbidden_env_key
from snapwake.v1 import nodeagent_pb2, types_pb2

GIB = 1 << 30


def _config(tmp_path: Path, **kw: Any) -> NodeAgentConfig:
    (tmp_path / "hs").mkdir(exist_ok=True)
    return NodeAgentConfig(handover_socket=str(tmp_path / "hs" / "h.sock"), state_dir=str(tmp_path / "st"),
                           model_roots=(str(tmp_path),), **kw)


def _req(model: Path | str = "", **resources: int) -> nodeagent_pb2.StartInstanceRequest:
    return nodeagent_pb2.StartInstanceRequest(
        instance_id="i-0123456789ab", function_id="default/default/demo", revision=1, gpu_index=3,
        spec=types_pb2.FunctionSpec(model_dir=str(model), resources=types_pb2.Resources(**resources)))


# ---- the OCI config ---------------------------------------------------------------------------

def test_every_container_gets_the_whole_sandbox(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    idir = tmp_path / "st" / "instances" / "i-0123456789ab"
    cfg = build_config(bundle_spec(_config(tmp_path), _req(model), StartPlan.RUNNING, 9000, idir, None))
    process, linux = cfg["process"], cfg["linux"]
    assert process["user"] == {"uid": 0, "gid": 0, "additionalGids": []}
    assert all(caps == [] for caps in process["capabilities"].values()) and len(process["capabilities"]) == 5
    assert process["noNewPrivileges"] is True and cfg["root"]["readonly"] is True
    assert linux["uidMappings"] == linux["gidMappings"] == [{"containerID": 0, "hostID": 100_000, "size": 65_536}]
    assert {"network", "user"} <= {n["type"] for n in linux["namespaces"]}
    assert "/proc/keys" in linux["maskedPaths"] and "/proc/sys" in linux["readonlyPaths"]
    assert linux["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO" and linux["seccomp"]["syscalls"]
    assert linux["cgroupsPath"] == "/snapwake/i-0123456789ab"
    res = linux["resources"]
    assert res["memory"] == {"limit": 16 * GIB} and res["pids"] == {"limit": 4096}
    assert res["cpu"] == {"quota": 100_000, "period": 100_000}  # the default 1000 millicores
    assert res["devices"] == [{"allow": False, "access": "rwm"}]
    binds = {m["source"]: m for m in cfg["mounts"] if m["type"] == "bind"}
    assert not any(src == "/etc" or src.startswith(("/etc/", "/dev")) for src in binds), sorted(binds)
    assert all("ro" in m["options"] for src, m in binds.items() if src != str(idir / "work")), binds
    assert "rw" in binds[str(idir / "work")]["options"]
    assert {"/sys": "sysfs", "/tmp": "tmpfs", "/dev": "tmpfs"}.items() <= {
        m["destination"]: m["type"] for m in cfg["mounts"]}.items()
    assert "size=1048576k" in next(m for m in cfg["mounts"] if m["destination"] == "/tmp")["options"]


@pytest.mark.parametrize(("resources", "process", "gpu", "memory", "cpu"), [
    ({}, False, False, 16 * GIB, 1000),
    ({"host_memory_bytes": 2 * GIB, "cpu_millis": 2500}, False, False, 2 * GIB, 2500),
    # The driver checkpoint of a PROCESS-mode standby parks its GPU state in its host memory.
    ({"host_memory_bytes": 2 * GIB, "gpu_memory_bytes": 10 * GIB}, True, True, 12 * GIB, 1000),
    ({"gpu_memory_bytes": 10 * GIB}, True, True, 26 * GIB, 1000),  # on top of the default 16 GiB
    ({"gpu_memory_bytes": 10 * GIB}, True, False, 16 * GIB, 1000),  # on the CPU nothing is parked
    ({"host_memory_bytes": 2 * GIB, "gpu_memory_bytes": 10 * GIB}, False, True, 2 * GIB, 1000),
])
def test_limits_come_from_the_spec(tmp_path: Path, resources: dict[str, int], process: bool, gpu: bool,
                                   memory: int, cpu: int) -> None:
    spec = types_pb2.FunctionSpec(resources=types_pb2.Resources(**resources))
    if process:
        spec.policy.snapshot_mode = types_pb2.SNAPSHOT_MODE_PROCESS
    limits = container_limits(_config(tmp_path), spec, gpu)
    assert (limits.memory_bytes, limits.cpu_millis, limits.pids) == (memory, cpu, 4096)
    assert build_config(BundleSpec((), {}, "/", "h", limits=limits))["linux"]["resources"]["cpu"] == {
        "quota": cpu * 100, "period": 100_000}


def test_write_bundle_makes_the_root_without_writing_outside(tmp_path: Path) -> None:
    spec = BundleSpec(("/x",), {}, "/", "h", ro_binds=("/usr", str(tmp_path / "model")),
                      ro_mounts=((f"{DRIVER_DIR}/libcuda.so.1", str(tmp_path / "lib")),),
                      symlinks=(("bin", "usr/bin"), (f"{DRIVER_DIR[1:]}/libcuda.so", "libcuda.so.1")),
                      files=(("etc/passwd", "root:x:0:0::/:/bin/sh\n"),))
    (tmp_path / "model").mkdir()
    (tmp_path / "lib").write_text("elf")
    rootfs = tmp_path / "elsewhere" / "i-1"
    bundle = write_bundle(tmp_path / "b", spec, rootfs)
    config = json.loads((bundle / "config.json").read_text())
    assert config["root"]["path"] == str(rootfs)
    assert stat.S_IMODE((bundle / "config.json").stat().st_mode) == 0o600  # env may hold secrets
    assert (rootfs / "usr").is_dir() and (rootfs / "proc").is_dir()
    assert stat.S_IMODE((rootfs / "tmp").stat().st_mode) == 0o1777  # runc gives the tmpfs this mode
    assert (rootfs / DRIVER_DIR[1:] / "libcuda.so.1").is_file()  # a file mount point for a file
    assert (rootfs / "etc" / "passwd").read_text().startswith("root:")
    # Below /tmp (the container's own tmpfs) runc makes the mount point, inside that tmpfs.
    assert not (rootfs / str(tmp_path / "model")[1:]).exists()


def test_write_bundle_never_follows_a_link_on_the_way(tmp_path: Path) -> None:
    (tmp_path / "host-etc").mkdir()
    spec = BundleSpec(("/x",), {}, "/", "h", symlinks=(("snapwake", str(tmp_path / "host-etc")),),
                      ro_mounts=((f"{DRIVER_DIR}/libcuda.so.1", "/dev/null"),))
    with pytest.raises(ValueError, match="symlink"):
        write_bundle(tmp_path / "b", spec)
    assert list((tmp_path / "host-etc").iterdir()) == []


# ---- seccomp ----------------------------------------------------------------------------------

_PROFILE: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
    "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]},
                {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}],
    "syscalls": [
        {"names": ["read", "clone", "mount", "unshare"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64"]}},
        {"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["bpf"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1, "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["newcall"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "6.10"}},
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]},
    ]}


def _rules(out: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    by_name: dict[str, list[dict[str, Any]]] = {}
    for rule in out["syscalls"]:
        for name in rule["names"]:
            by_name.setdefault(name, []).append(rule)
    return by_name


@pytest.mark.parametrize(("machine", "kernel", "present", "absent"), [
    ("x86_64", "6.18.4", {"read", "arch_prctl", "newcall", "personality"}, set()),
    ("aarch64", "6.1.0", {"read"}, {"arch_prctl", "newcall"}),
])
def test_seccomp_resolves_the_profile_conditions(machine: str, kernel: str, present: set[str], absent: set[str]) -> None:
    out = seccomp.translate(_PROFILE, machine=machine, kernel=kernel)
    rules = _rules(out)
    assert out["defaultAction"] == "SCMP_ACT_ERRNO" and out["defaultErrnoRet"] == 38
    assert out["architectures"][0] == ("SCMP_ARCH_X86_64" if machine == "x86_64" else "SCMP_ARCH_AARCH64")
    assert present <= set(rules) and not absent & set(rules)
    assert [r["action"] for r in rules["bpf"]] == ["SCMP_ACT_ERRNO"]  # no CAP_SYS_ADMIN: the errno rule
    assert rules["personality"][0]["args"] == [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]


def test_seccomp_refuses_namespaces_and_mounts_without_caps() -> None:
    rules = _rules(seccomp.translate(_PROFILE, machine="x86_64", kernel="6.1"))
    assert [r["action"] for r in rules["mount"]] == [r["action"] for r in rules["unshare"]] == ["SCMP_ACT_ERRNO"]
    assert rules["clone3"] == [{"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]
    (clone,) = rules["clone"]  # allowed only with no CLONE_NEW* flag
    assert clone["action"] == "SCMP_ACT_ALLOW" and clone["args"][0]["op"] == "SCMP_CMP_MASKED_EQ"
    kept = _rules(seccomp.translate(_PROFILE, machine="x86_64", kernel="6.1", confine_namespaces=False))
    assert kept["mount"][0]["action"] == "SCMP_ACT_ALLOW"


def test_the_installed_profile_translates() -> None:
    if not Path(seccomp.DEFAULT_PROFILE).exists():
        pytest.skip("golang-github-containers-common is not installed")
    rules = _rules(seccomp.load())
    assert rules["read"][0]["action"] == "SCMP_ACT_ALLOW"
    assert rules["kexec_load"][0]["action"] == "SCMP_ACT_ERRNO"
    assert all(r["action"] == "SCMP_ACT_ERRNO" for r in rules["mount"] + rules["bpf"] + rules["unshare"])


# ---- the node's spec checks ---------------------------------------------------------------------

@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    root, state = tmp_path / "models", tmp_path / "state"
    (root / "llama").mkdir(parents=True)
    (root / "private").mkdir(mode=0o700)
    (state / "instances" / "i-1").mkdir(parents=True)
    (root / "escape").symlink_to("/etc")
    (root / "into-state").symlink_to(state / "instances" / "i-1")
    return {"root": root, "state": state}


@pytest.mark.parametrize(("model_dir", "needle"), [
    ("/", "not below"),
    ("{root}/../state", "'..'"),
    ("{root}/llama/../llama", "'..'"),
    ("relative/llama", "absolute"),
    ("{root}/escape", "resolves to /etc"),
    ("/etc", "not below"),
    ("{root}/into-state", "node's own state"),
    ("{root}/missing", "not a directory"),
    ("{root}/private", "o+rx"),
])
def test_model_dir_must_resolve_below_a_model_root(roots: dict[str, Path], model_dir: str, needle: str) -> None:
    path = model_dir.format(root=roots["root"])
    with pytest.raises(errors.InvalidArgument, match="spec.model_dir") as caught:
        spec_checks.resolve_model_dir(path, [str(roots["root"]), str(roots["root"] / "into-state")],
                                      [str(roots["state"])])
    assert caught.value.field == "spec.model_dir" and needle in caught.value.message


def test_model_dir_below_a_root_resolves(roots: dict[str, Path]) -> None:
    link = roots["root"] / "alias"
    link.symlink_to(roots["root"] / "llama")
    assert spec_checks.resolve_model_dir(str(link), [str(roots["root"])], []) == str(roots["root"] / "llama")


def test_a_model_dir_with_files_others_cannot_read_is_refused_naming_the_file(roots: dict[str, Path]) -> None:
    model = roots["root"] / "llama"
    (model / "config.json").write_text("{}")
    (model / "config.json").chmod(0o644)
    shard = model / "model-00001.safetensors"
    shard.write_bytes(b"x")
    shard.chmod(0o600)  # what safetensors' save_file leaves
    with pytest.raises(errors.InvalidArgument, match=r"model-00001\.safetensors \(mode 0600\)") as caught:
        spec_checks.resolve_model_dir(str(model), [str(roots["root"])], [])
    assert caught.value.field == "spec.model_dir" and "chmod -R o+rX" in caught.value.message
    shard.chmod(0o644)
    assert spec_checks.resolve_model_dir(str(model), [str(roots["root"])], []) == str(model)


@pytest.mark.parametrize(("key", "refused"), [
    ("LD_PRELOAD", True), ("LD_LIBRARY_PATH", True), ("PYTHONPATH", True), ("PYTHONSTARTUP", True),
    ("PERL5LIB", True), ("NODE_OPTIONS", True), ("BASH_ENV", True), ("ENV", True), ("GLIBC_TUNABLES", True),
    ("BASH_FUNC_ls%%", True), ("JAVA_TOOL_OPTIONS", True), ("SNAPWAKE_CONTROL_SOCKET", True),
    ("CUDA_VISIBLE_DEVICES", True), ("NVIDIA_VISIBLE_DEVICES", True),
    ("HF_TOKEN", False), ("MY_LD_FLAG", False), ("ld_preload", False), ("ENVIRONMENT", False), ("TZ", False),
])
def test_env_keys_that_steer_a_loader_or_interpreter_are_refused(key: str, refused: bool) -> None:
    assert (forbidden_env_key(key) is not None) is refused
    if refused:
        with pytest.raises(errors.InvalidArgument, match=key.replace("%", ".")) as caught:
            spec_checks.check_env({"A": "1", key: "x"})
        assert caught.value.field == "spec.env"
    else:
        spec_checks.check_env({key: "x"})


# ---- GPU nodes and driver files -----------------------------------------------------------------

_LDCONFIG = """3 libs found in cache `/etc/ld.so.cache'
\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1
\tlibcuda.so.1 (libc6) => /usr/lib/i386-linux-gnu/libcuda.so.1
\tlibnvidia-ml.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1
\tlibz.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libz.so.1
"""


def test_ldconfig_entries_and_driver_layout() -> None:
    entries = devices.parse_ldconfig(_LDCONFIG)
    assert entries == [("libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.1"),
                       ("libnvidia-ml.so.1", "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"),
                       ("libz.so.1", "/lib/x86_64-linux-gnu/libz.so.1")]
    real = {"libcuda.so.1": "/drv/libcuda.so.550.54", "libnvidia-ml.so.1": "/drv/libnvidia-ml.so.550.54",
            "libz.so.1": "/lib/libz.so.1.2"}
    mounts, links = devices.driver_layout((name, real[name]) for name, _ in entries)
    assert mounts == ((f"{DRIVER_DIR}/libcuda.so.550.54", "/drv/libcuda.so.550.54"),
                      (f"{DRIVER_DIR}/libnvidia-ml.so.550.54", "/drv/libnvidia-ml.so.550.54"))
    assert dict(links) == {f"{DRIVER_DIR}/libcuda.so.1": "libcuda.so.550.54", f"{DRIVER_DIR}/libcuda.so": "libcuda.so.1",
                           f"{DRIVER_DIR}/libnvidia-ml.so.1": "libnvidia-ml.so.550.54"}


def test_discover_finds_nodes_by_minor_and_the_driver_dir(tmp_path: Path) -> None:
    dev, lib = tmp_path / "dev", tmp_path / "lib"
    dev.mkdir()
    lib.mkdir()
    for name in ("nvidia7", "nvidiactl", "nvidia-uvm"):
        (dev / name).symlink_to("/dev/null")  # a character device to stat
    (lib / "libcuda.so.550.54").write_text("elf")
    (lib / "libcuda.so.1").symlink_to("libcuda.so.550.54")
    found = devices.discover({0: (7, "GPU-abc")}, str(lib), str(dev))
    null = os.stat("/dev/null")
    assert found.nodes[0] == Device(str(dev / "nvidia7"), os.major(null.st_rdev), os.minor(null.st_rdev), 0o666)
    assert [d.path for d in found.control] == [str(dev / "nvidiactl"), str(dev / "nvidia-uvm")]
    access = found.access(0)
    assert [d.path for d in access.devices] == [str(dev / "nvidia7"), str(dev / "nvidiactl"), str(dev / "nvidia-uvm")]
    assert access.env == {"LD_LIBRARY_PATH": DRIVER_DIR, "CUDA_VISIBLE_DEVICES": "0",
                          "NVIDIA_VISIBLE_DEVICES": "GPU-abc", "NVIDIA_DRIVER_CAPABILITIES": "compute,utility"}
    assert (f"{DRIVER_DIR}/libcuda.so.550.54", str(lib / "libcuda.so.550.54")) in access.mounts
    with pytest.raises(OSError):
        devices.discover({0: (8, "GPU-x")}, str(lib), str(dev))  # no /dev/nvidia8
    with pytest.raises(ValueError):
        devices.device_node(str(lib / "libcuda.so.1"))
    assert NodeGpus().access(0).devices == ()


def test_gpu_container_gets_device_nodes_driver_files_and_cuda_device_zero(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    gpu = NodeGpus((Device("/dev/nvidiactl", 195, 255),), {3: Device("/dev/nvidia3", 195, 3)}, {3: "GPU-3"},
                   ((f"{DRIVER_DIR}/libcuda.so.550", "/drv/libcuda.so.550"),),
                   ((f"{DRIVER_DIR}/libcuda.so.1", "libcuda.so.550"),)).access(3)
    spec = bundle_spec(_config(tmp_path), _req(model), StartPlan.RUNNING, 9000, tmp_path / "i", gpu)
    args = list(spec.args)
    assert args[args.index("--gpu-index") + 1] == "3" and args[args.index("--cuda-device") + 1] == "0"
    assert spec.env["LD_LIBRARY_PATH"] == DRIVER_DIR and spec.env["CUDA_VISIBLE_DEVICES"] == "0"
    cfg = build_config(spec)
    assert [d["path"] for d in cfg["linux"]["devices"]] == ["/dev/nvidia3", "/dev/nvidiactl"]
    assert {"destination": f"{DRIVER_DIR}/libcuda.so.550", "type": "bind", "source": "/drv/libcuda.so.550",
            "options": ["rbind", "ro", "nosuid", "nodev"]} in cfg["mounts"]


# ---- user images --------------------------------------------------------------------------------

_PASSWD = "root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1000::/home/web:/bin/sh\nbad line\n"
_GROUP = "root:x:0:\nweb:x:1000:\nvideo:x:44:web,other\n"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    root = tmp_path / "image"
    for d in ("usr/bin", "etc", "app", "tmp", "proc", "snapwake"):
        (root / d).mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "etc" / "passwd").write_text(_PASSWD)
    (root / "etc" / "group").write_text(_GROUP)
    (root / "init").write_text("#!/bin/sh\n")
    return root


@pytest.mark.parametrize(("user", "want"), [
    ("", ImageUser(0, 0, (), "/root")),
    ("web", ImageUser(1000, 1000, (44,), "/home/web")),
    ("1000", ImageUser(1000, 1000, (44,), "/home/web")),
    ("1000:44", ImageUser(1000, 44, (), "/home/web")),
    ("web:video", ImageUser(1000, 44, (), "/home/web")),
    ("4242", ImageUser(4242, 0, (), "/")),
])
def test_image_user_resolves_like_docker(image: Path, user: str, want: ImageUser) -> None:
    assert resolve_user(image, user, 65536) == want


@pytest.mark.parametrize(("user", "needle"), [
    ("nobody-here", "no such user"), ("web:nogroup", "no such group"), ("70000", "outside"),
])
def test_bad_image_user_is_refused(image: Path, user: str, needle: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=needle):
        resolve_user(image, user, 65536)


def test_image_files_are_read_inside_the_image(image: Path, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("root:x:0:0:HOST:/:/bin/sh\n")
    (image / "etc" / "passwd").unlink()
    (image / "etc" / "passwd").symlink_to(secret)  # absolute: taken inside the image, where it is absent
    assert read_in_root(image, "/etc/passwd") is None
    (image / "etc" / "group").unlink()
    (image / "etc" / "group").symlink_to("../../../../../etc/group-in-image")  # '..' stops at the root
    (image / "etc" / "group-in-image").write_text(_GROUP)
    assert read_in_root(image, "/etc/group") == _GROUP
    assert parse_passwd(_PASSWD) == {"root": (0, 0, "/root"), "web": (1000, 1000, "/home/web")}
    assert parse_group(_GROUP)[2] == ("video", 44, ("web", "other"))


def test_image_layout_binds_the_top_level_and_keeps_the_sandbox_own_paths(image: Path) -> None:
    mounts, links = image_layout(image)
    assert dict(mounts) == {"/app": str(image / "app"), "/etc": str(image / "etc"), "/init": str(image / "init"),
                            "/usr": str(image / "usr")}
    assert links == (("bin", "usr/bin"),)


def test_user_image_bundle(tmp_path: Path, image: Path) -> None:
    class Config:
        entrypoint = ["/usr/bin/server"]
        cmd = ["--port", "8080"]
        env = ["PATH=/usr/bin", "LD_LIBRARY_PATH=/opt/lib", "MODE=image"]
        working_dir = "/app"
        user = "web"

    model = tmp_path / "model"
    model.mkdir()
    gpu = NodeGpus((Device("/dev/nvidiactl", 195, 255),), {3: Device("/dev/nvidia3", 195, 3)}, {},
                   ((f"{DRIVER_DIR}/libcuda.so.550", "/drv/libcuda.so.550"),), ()).access(3)
    config = _config(tmp_path)
    spec = user_image_bundle_spec(config, _req(model), image, Config(), (), {"MODE": "spec"}, 8080,
                                  tmp_path / "i", gpu)
    assert spec.args == ("/usr/bin/server", "--port", "8080") and spec.cwd == "/app"
    assert spec.user == (1000, 1000) and spec.groups == (44,)
    assert spec.env["MODE"] == "spec" and spec.env["PATH"] == "/usr/bin" and spec.env["HOME"] == "/home/web"
    assert spec.env["LD_LIBRARY_PATH"] == f"{DRIVER_DIR}:/opt/lib" and spec.env["PORT"] == "8080"
    assert spec.env["SNAPWAKE_MODEL_DIR"] == MODEL_DIR and (MODEL_DIR, str(model)) in spec.ro_mounts
    assert spec.ro_binds == spec.rw_binds == () and spec.files == ()  # nothing of the host but the driver
    sources = [src for _, src in spec.ro_mounts]
    assert all(s.startswith((str(image), str(model), "/drv/")) for s in sources), sources
    assert [d.path for d in spec.devices] == ["/dev/nvidia3", "/dev/nvidiactl"]
    override = user_image_bundle_spec(config, _req(), image, Config(), ("/app/run",), {}, 8080, tmp_path / "i", None)
    assert override.args == ("/app/run",)
    assert override.env["LD_LIBRARY_PATH"] == "/opt/lib" and not override.devices


# ---- config, cgroups ----------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "needle"), [
    ({"model_roots": ("/",)}, "model_roots"),
    ({"model_roots": ("models",)}, "model_roots"),
    ({"userns_base": 0}, "userns_base"),
    ({"seccomp_profile": "/nonexistent.json"}, "seccomp_profile"),
    ({"pids_limit": 1}, "pids_limit"),
    ({"default_memory_bytes": 1}, "default_memory_bytes"),
    ({"cgroup_parent": "../x"}, "cgroup_parent"),
    ({"rootfs_dir": "rel"}, "rootfs_dir"),
    ({"forward_idle_timeout": 0}, "forward_idle_timeout"),
])
def test_bad_sandbox_keys_are_named(change: dict[str, Any], needle: str) -> None:
    assert any(needle in problem for problem in NodeAgentConfig(**change).validate())


def test_instance_host_defaults_to_the_advertised_host() -> None:
    assert NodeAgentConfig(listen="0.0.0.0:7070", advertise="10.1.2.3:7070").instance_host == "10.1.2.3"
    assert NodeAgentConfig(endpoint_host="10.9.9.9").instance_host == "10.9.9.9"


@pytest.mark.parametrize(("v2", "text", "kills"), [
    (False, "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", 3),
    (True, "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\n", 2),
    (False, "oom_kill_disable 0\n", 0),
])
def test_oom_kills_are_read_from_the_memory_cgroup(tmp_path: Path, v2: bool, text: str, kills: int) -> None:
    where = tmp_path / ("snapwake/i-1" if v2 else "memory/snapwake/i-1")
    where.mkdir(parents=True)
    (where / ("memory.events" if v2 else "memory.oom_control")).write_text(text)
    if v2:
        (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    assert cgroups.oom_kills("/snapwake/i-1", tmp_path) == kills
    assert cgroups.oom_kills("/snapwake/gone", tmp_path) == 0


def test_id_map_and_limits_defaults() -> None:
    assert IdMap().host(0) == 100_000 and IdMap(200_000).host(1000) == 201_000
    assert Limits().memory_bytes == 0  # no limit unless given
