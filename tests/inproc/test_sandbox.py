"""The instance sandbox, proved from inside real runc containers.

Each container is the nodeagent's own built-in model server bundle (``container.bundle_spec``:
user and network namespaces, no capabilities, seccomp, generated /etc, cgroup limits) with the
model server's command line swapped for a short Python program on the host's interpreter
(bound read-only, as for the model server). The program prints one JSON line; the test reads
it from the container's output. The OOM report goes through a whole nodeagent, with the
stand-in model server of the unit tests as its "model server".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.nodeagent import cgroups, operations
from services.nodeagent.bundle import IdMap, Limits, write_bundle
from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.container import (
    bundle_spec,
    cgroup_path,
    make_work_dir,
    user_image_bundle_spec,
    work_dir,
)
from services.nodeagent.containers import ContainerStatus, RuncContainers
from services.nodeagent.forward import Forwarder, NetNs
from services.nodeagent.machine import StartPlan
from services.nodeagent.server import serve
from snapwake import errors, keys
from snapwake.etcd import Etcd
from snapwake.grpcserver import GrpcServer
from snapwake.testing import EtcdProcess, free_port
from snapwake.v1 import types_pb2
from snapwake.v1.types_pb2 import InstanceState
from tests.inproc.test_nodeagent_support import start_request

pytestmark = [pytest.mark.skipif(shutil.which("runc") is None or os.geteuid() != 0,
                                 reason="needs runc and root"),
              pytest.mark.timeout(60)]
STUB = Path(__file__).resolve().parents[1] / "unit" / "stub_modelserver.py"
INNER_PORT = 8000


def _host_ip() -> str:
    """This host's address on its default route (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return str(s.getsockname()[0])
        except OSError:
            return ""


# Run inside: tries each (host, port) and prints what happened, as one JSON line.
_PROBE_CONNECT = """
import json, socket, sys
out = {}
for host, port in json.loads(sys.argv[1]):
    s = socket.socket(socket.AF_UNIX if host == "@" else socket.AF_INET)
    s.settimeout(2)
    try:
        s.connect("\\0" + str(port) if host == "@" else (host, port))
        out[f"{host}:{port}"] = "connected"
    except OSError as exc:
        out[f"{host}:{port}"] = type(exc).__name__ + ":" + str(exc.errno)
print(json.dumps(out), flush=True)
"""


@dataclass
class Box:
    """One running sandbox container."""

    id: str
    pid: int
    dir: Path
    cgroup: str
    runc: RuncContainers

    @property
    def log(self) -> Path:
        return self.dir / "output.log"

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    async def result(self, limit_s: float = 20.0) -> dict[str, Any]:
        """The JSON line the program printed."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
                if line.startswith("{"):
                    return dict(json.loads(line))
            await asyncio.sleep(0.05)
        raise AssertionError(f"no result from {self.id}; output:\n{self.output()}")

    async def stopped(self, limit_s: float = 20.0) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            state = await self.runc.state(self.id)
            if state is None or state.status is ContainerStatus.STOPPED:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.id} still runs; output:\n{self.output()}")


class Sandboxes:
    """Starts containers in the nodeagent's sandbox, each with its own instance dir."""

    def __init__(self, state: Path) -> None:
        self.state = state
        (state / "model").mkdir()
        (state / "hs").mkdir()
        (state / "instances").mkdir(mode=0o711)
        self.config = NodeAgentConfig(state_dir=str(state), handover_socket=str(state / "hs" / "h.sock"),
                                      model_roots=(str(state),))
        self.runc = RuncContainers(self.config.runc_root, prefix="sb-")
        self.boxes: list[Box] = []

    async def start(self, program: str, *args: str, limits: Limits | None = None) -> Box:
        n = len(self.boxes)
        iid = f"i-5a4db0{n:06x}"
        idir = self.config.instances_dir / iid
        idir.mkdir(parents=True)
        make_work_dir(idir, IdMap(self.config.userns_base, self.config.userns_size))
        req = start_request(iid, self.state / "model")
        spec = bundle_spec(self.config, req, StartPlan.RUNNING, INNER_PORT, idir, None)
        spec = dataclasses.replace(spec, args=(sys.executable, "-c", textwrap.dedent(program), *args),
                                   limits=limits or spec.limits)
        bundle = write_bundle(idir / "bundle", spec)
        box = Box(f"sb-{iid}", 0, idir, spec.cgroup_path, self.runc)
        box.pid = await self.runc.run(box.id, bundle, box.log)
        self.boxes.append(box)
        return box

    async def close(self) -> None:
        for box in self.boxes:
            await self.runc.delete(box.id)


def _short_dir(prefix: str, mode: int = 0o711) -> Path:
    """A short path (Unix sockets go below it) that runc, in the user namespace, can walk through."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(mode)
    return path


@pytest.fixture
async def sandboxes() -> AsyncIterator[Sandboxes]:
    state = _short_dir("swsb-")
    boxes = Sandboxes(state)
    try:
        yield boxes
    finally:
        await boxes.close()
        shutil.rmtree(state, ignore_errors=True)


@contextlib.contextmanager
def _listener(host: str) -> Iterator[int]:
    """A TCP listener on the host: what the container must not reach."""
    with socket.socket() as s:
        s.bind((host, 0))
        s.listen()
        yield int(s.getsockname()[1])


def _reachable_from_host(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) == 0


async def test_cannot_reach_etcd(sandboxes: Sandboxes, etcd_server: EtcdProcess) -> None:
    port = etcd_server.client_port
    assert _reachable_from_host("127.0.0.1", port)
    targets = [["127.0.0.1", port]] + ([[_host_ip(), port]] if _host_ip() else [])
    box = await sandboxes.start(_PROBE_CONNECT, json.dumps(targets))
    got = await box.result()
    assert got[f"127.0.0.1:{port}"].startswith("ConnectionRefusedError"), got  # its own loopback: nothing
    assert all(v != "connected" for v in got.values()), got


async def test_cannot_reach_a_grpc_service(sandboxes: Sandboxes) -> None:
    server = GrpcServer("0.0.0.0:0", ["snapwake.test"])  # every host address, not only loopback
    await server.start()
    try:
        ip = _host_ip()
        assert _reachable_from_host("127.0.0.1", server.port) and (not ip or _reachable_from_host(ip, server.port))
        targets = [["127.0.0.1", server.port]] + ([[ip, server.port]] if ip else [])
        got = await (await sandboxes.start(_PROBE_CONNECT, json.dumps(targets))).result()
    finally:
        await server.stop(grace=0)
    assert got[f"127.0.0.1:{server.port}"].startswith("ConnectionRefusedError"), got
    if ip:  # the only route out is loopback
        assert got[f"{ip}:{server.port}"].startswith("OSError:101"), got  # ENETUNREACH
    assert all(v != "connected" for v in got.values()), got


async def test_cannot_reach_the_host_loopback(sandboxes: Sandboxes) -> None:
    with _listener("127.0.0.1") as port, socket.socket(socket.AF_UNIX) as abstract:
        abstract.bind(f"\0swsb-{port}")  # abstract Unix sockets belong to a network namespace
        abstract.listen()
        targets = [["127.0.0.1", port], ["@", f"swsb-{port}"], ["10.0.0.1", 80], ["8.8.8.8", 53]]
        got = await (await sandboxes.start(_PROBE_CONNECT, json.dumps(targets))).result()
    assert got[f"127.0.0.1:{port}"].startswith("ConnectionRefusedError"), got
    assert got[f"@:swsb-{port}"].startswith("ConnectionRefusedError"), got
    assert got["10.0.0.1:80"].startswith("OSError:101") and got["8.8.8.8:53"].startswith("OSError:101"), got


_HTTP_SERVER = """
import asyncio, json, sys
async def handle(reader, writer):
    head = await reader.readuntil(b"\\r\\n\\r\\n")
    length = next((int(l.split(b":")[1]) for l in head.split(b"\\r\\n") if l.lower().startswith(b"content-length:")), 0)
    body = await reader.readexactly(length)
    if head.startswith(b"GET /events"):
        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: text/event-stream\\r\\nTransfer-Encoding: chunked\\r\\nConnection: close\\r\\n\\r\\n")
        for i in range(5):
            event = b"data: " + json.dumps({"i": i}).encode() + b"\\n\\n"
            writer.write(b"%x\\r\\n%s\\r\\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.2)
        writer.write(b"0\\r\\n\\r\\n")
    else:
        reply = json.dumps({"echo": body.decode(), "path": head.split(b" ")[1].decode()}).encode()
        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n%s"
                     % (len(reply), reply))
    await writer.drain()
    writer.close()
async def main():
    await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    print(json.dumps({"listening": int(sys.argv[1])}), flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def _forwarded(box: Box) -> Forwarder:
    fwd = Forwarder("127.0.0.1", INNER_PORT, idle_timeout=30)
    await fwd.start()
    fwd.attach(NetNs.of_pid(box.pid))
    return fwd


async def test_cannot_reach_another_instance(sandboxes: Sandboxes) -> None:
    other = await sandboxes.start(_HTTP_SERVER, str(INNER_PORT))
    await other.result()
    fwd = await _forwarded(other)
    try:
        async with httpx.AsyncClient() as http:  # the host (the gateway) reaches it, through the forwarder
            assert (await http.post(f"http://{fwd.endpoint}/ping", content=b"x", timeout=5)).status_code == 200
        targets = [["127.0.0.1", fwd.port], ["127.0.0.1", INNER_PORT]] + ([[_host_ip(), fwd.port]] if _host_ip() else [])
        got = await (await sandboxes.start(_PROBE_CONNECT, json.dumps(targets))).result()
    finally:
        await fwd.close()
    # Its forwarder is on the host; its server is in another namespace; this one has neither.
    assert got[f"127.0.0.1:{fwd.port}"].startswith("ConnectionRefusedError"), got
    assert got[f"127.0.0.1:{INNER_PORT}"].startswith("ConnectionRefusedError"), got
    assert all(v != "connected" for v in got.values()), got


async def test_forwarder_carries_a_request_and_an_sse_stream(sandboxes: Sandboxes) -> None:
    box = await sandboxes.start(_HTTP_SERVER, str(INNER_PORT))
    await box.result()
    fwd = await _forwarded(box)
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            reply = await http.post(f"http://{fwd.endpoint}/v1/chat/completions", content=b'{"a": 1}')
            assert reply.status_code == 200 and reply.json() == {"echo": '{"a": 1}', "path": "/v1/chat/completions"}
            arrivals = []
            async with http.stream("GET", f"http://{fwd.endpoint}/events") as stream:
                assert stream.headers["content-type"] == "text/event-stream"
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        arrivals.append((time.monotonic(), json.loads(line[6:])["i"]))
        assert [i for _, i in arrivals] == [0, 1, 2, 3, 4]
        # Each event arrives when it is sent (0.2 s apart), not buffered up to the end.
        gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:], strict=False)]
        assert min(gaps) > 0.1, gaps
    finally:
        await fwd.close()


def _shell_image(root: Path, base: int) -> Path:
    """A tiny image rootfs: the host's dash and the two libraries it needs, its own /etc and an
    /app dir, owned by the mapped range as an unpacked image is (no busybox needed)."""
    for d in ("usr/bin", "usr/lib/x86_64-linux-gnu", "lib64", "etc", "app"):
        (root / d).mkdir(parents=True)
    for src, dest in (("/bin/dash", "usr/bin/dash"), ("/lib/x86_64-linux-gnu/libc.so.6", "usr/lib/x86_64-linux-gnu/libc.so.6"),
                      ("/lib64/ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2")):
        shutil.copy(os.path.realpath(src), root / dest)
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("usr/lib")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1000::/home/web:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nweb:x:1000:\nvideo:x:44:web\n")
    for path in (root, *root.rglob("*")):
        os.lchown(path, base + (path.lstat().st_uid if path.is_symlink() else 0), base)
    return root


@dataclass(frozen=True)
class _ImageConfig:
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ("MODE=image", "PATH=/bin")
    working_dir: str = "/app"
    user: str = "web"


_SHELL_PROBE = """
while read k a b c d; do case $k in Uid:|Gid:|Groups:) echo "$k $a $b";; esac; done < /proc/self/status
echo "pwd=$(pwd) home=$HOME mode=$MODE spec=$FROM_SPEC port=$PORT"
if echo x > /tmp/t && echo x > /dev/shm/t; then echo tmp=writable; fi
if (echo x > /app/t) 2>/dev/null; then echo root=writable; else echo root=read-only; fi
read first < /etc/passwd; echo "passwd=$first"
echo done
"""


async def test_user_image_runs_as_its_user_in_a_read_only_root(sandboxes: Sandboxes) -> None:
    config = sandboxes.config
    image = await asyncio.to_thread(_shell_image, sandboxes.state / "image", config.userns_base)
    iid = "i-5a4db0ffffff"
    idir = config.instances_dir / iid
    req = start_request(iid, sandboxes.state / "model")
    spec = user_image_bundle_spec(config, req, image, _ImageConfig(entrypoint=("/bin/dash", "-c", _SHELL_PROBE)),
                                  (), {"FROM_SPEC": "yes"}, 8080, idir, None)
    bundle = await asyncio.to_thread(write_bundle, idir / "bundle", spec)
    box = Box(f"sb-{iid}", 0, idir, spec.cgroup_path, sandboxes.runc)
    box.pid = await sandboxes.runc.run(box.id, bundle, box.log)
    sandboxes.boxes.append(box)
    await box.stopped()
    out = box.output()
    assert "done" in out, out
    assert "Uid: 1000 1000" in out and "Gid: 1000 1000" in out and "Groups: 44" in out, out
    assert "pwd=/app home=/home/web mode=image spec=yes port=8080" in out, out
    assert "tmp=writable" in out and "root=read-only" in out, out
    assert "passwd=root:x:0:0:root:/root:/bin/sh" in out, out  # the image's own /etc, not the host's
    assert not (image / "proc").exists() and not (image / "tmp").exists()  # nothing was made in the image


async def test_forwarder_closes_an_idle_connection(sandboxes: Sandboxes) -> None:
    box = await sandboxes.start(_HTTP_SERVER, str(INNER_PORT))
    await box.result()
    fwd = Forwarder("127.0.0.1", INNER_PORT, idle_timeout=0.5)
    await fwd.start()
    fwd.attach(NetNs.of_pid(box.pid))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", fwd.port)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the forwarder, not the server
        assert 0.4 < time.monotonic() - started < 3
        writer.close()
    finally:
        await fwd.close()


async def test_forwarder_refuses_the_host_namespace() -> None:
    with pytest.raises(OSError, match="host's network namespace"):
        NetNs.of_pid(os.getpid())


async def test_cannot_read_host_etc_shadow_or_devices(sandboxes: Sandboxes) -> None:
    assert await asyncio.to_thread(os.path.exists, "/etc/shadow")  # there is one to protect
    box = await sandboxes.start("""
        import json, os
        out = {"etc": sorted(os.listdir("/etc")), "dev": sorted(os.listdir("/dev"))}
        for path in ("/etc/shadow", "/proc/1/root/etc/shadow", "/proc/keys", "/proc/timer_list"):
            try:
                out[path] = len(open(path, "rb").read(16))
            except OSError as exc:
                out[path] = type(exc).__name__
        print(json.dumps(out), flush=True)
    """)
    got = await box.result()
    assert got["/etc/shadow"] == got["/proc/1/root/etc/shadow"] == "FileNotFoundError", got
    assert got["/proc/keys"] == got["/proc/timer_list"] == 0, got  # masked with /dev/null
    assert got["etc"] == ["group", "hostname", "hosts", "nsswitch.conf", "passwd", "resolv.conf"], got
    # runc's default nodes only: no disk, no kmsg, no host /dev.
    assert set(got["dev"]) <= {"full", "null", "random", "tty", "urandom", "zero", "ptmx", "pts", "shm",
                               "mqueue", "console", "core", "fd", "stdin", "stdout", "stderr"}, got


async def test_container_root_is_not_host_root(sandboxes: Sandboxes) -> None:
    box = await sandboxes.start("""
        import ctypes, json, os
        status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
        open("made-by-root", "w").write("x")  # the cwd: the instance's work dir
        libc = ctypes.CDLL(None, use_errno=True)
        unshare = libc.unshare(0x10000000)  # CLONE_NEWUSER
        unshare_errno = ctypes.get_errno()
        print(json.dumps({"uid": os.getuid(), "uid_map": open("/proc/self/uid_map").read().split(),
                          "cap_eff": status["CapEff"].strip(), "cap_bnd": status["CapBnd"].strip(),
                          "no_new_privs": status["NoNewPrivs"].strip(), "seccomp": status["Seccomp"].strip(),
                          "unshare": [unshare, unshare_errno]}), flush=True)
    """)
    got = await box.result()
    work = work_dir(box.dir)
    base = sandboxes.config.userns_base
    assert got["uid"] == 0 and got["uid_map"] == ["0", str(base), str(sandboxes.config.userns_size)], got
    made = (work / "made-by-root").stat()
    assert (made.st_uid, made.st_gid) == (base, base)  # host uid of the container's root
    assert got["cap_eff"] == got["cap_bnd"] == "0000000000000000", got
    assert got["no_new_privs"] == "1" and got["seccomp"] == "2", got
    assert got["unshare"] == [-1, 1], got  # EPERM: no new namespaces (seccomp)


async def test_fork_bomb_is_stopped_by_the_pids_limit(sandboxes: Sandboxes) -> None:
    limit = 48
    box = await sandboxes.start("""
        import json, os, time
        children, error = 0, None
        while children < 10_000:
            try:
                pid = os.fork()
            except OSError as exc:
                error = type(exc).__name__
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children += 1
        print(json.dumps({"children": children, "error": error}), flush=True)
        time.sleep(30)
    """, limits=Limits(memory_bytes=512 << 20, cpu_millis=1000, pids=limit))
    got = await box.result()
    current = int((Path("/sys/fs/cgroup/pids") / box.cgroup.strip("/") / "pids.current").read_text())
    assert got["error"] == "BlockingIOError" and got["children"] < limit, got  # EAGAIN from fork
    assert current <= limit
    host = await asyncio.create_subprocess_exec("true")
    assert await asyncio.wait_for(host.wait(), 10) == 0  # the host forks fine


async def test_memory_hog_is_oom_killed(sandboxes: Sandboxes) -> None:
    box = await sandboxes.start("""
        held = []
        while True:
            held.append(b"x" * (8 << 20))
    """, limits=Limits(memory_bytes=64 << 20, cpu_millis=1000, pids=64))
    await box.stopped()
    assert cgroups.oom_kills(box.cgroup) >= 1
    assert cgroup_path(sandboxes.config, box.id[3:]) == box.cgroup


def _stub_python(path: Path) -> None:
    """``path`` runs the stub model server; its dir's parent is bound into the container (python_dirs)."""
    path.parent.mkdir()
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STUB}" "$@"\n')
    path.chmod(0o755)


@pytest.fixture
async def hog_node(etcd_server: EtcdProcess) -> AsyncIterator[tuple[Any, Etcd]]:
    """A whole nodeagent whose "model server" is the unit tests' stub, run in the real sandbox."""
    state = _short_dir("swsh-")
    models = _short_dir("swsm-", 0o755)  # outside the node's state, as required
    _stub_python(state / "bin" / "python")
    config = NodeAgentConfig(
        name=f"node-{state.name[5:].lower()}", listen="127.0.0.1:0", etcd=etcd_server.address, etcd_plaintext=True,
        blobstore=f"127.0.0.1:{free_port()}", handover_socket=str(state / "hs" / "handover.sock"),
        state_dir=str(state), gpus="none", reconcile_interval=0.3, ended_linger=30.0, python=str(state / "bin" / "python"),
        model_roots=(str(models),))
    try:
        async with serve(config) as running, Etcd.connect(etcd_server.address) as store:
            yield running, store
    finally:
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(models, ignore_errors=True)


async def test_oom_killed_start_is_reported_as_such(hog_node: tuple[Any, Etcd]) -> None:
    running, store = hog_node
    req = start_request("i-00000000e00f", Path(running.agent.config.model_roots[0]), timeout_s=20)
    req.spec.env["STUB_BEHAVIOUR"] = "hog-at-start"
    req.spec.resources.host_memory_bytes = 96 << 20
    with pytest.raises(errors.StartFailed, match=r"exited before it was ready: out of memory \(limit 96 MiB\)"):
        await operations.start_instance(running.agent, req)
    entry = await store.get(keys.instance_key(running.agent.config.name, req.instance_id), types_pb2.Instance)
    assert entry is not None and "out of memory (limit 96 MiB)" in entry.value.message  # type: ignore[attr-defined]


async def test_oom_killed_instance_is_reported_as_such(hog_node: tuple[Any, Etcd]) -> None:
    running, store = hog_node
    iid = "i-00000000e00e"
    req = start_request(iid, Path(running.agent.config.model_roots[0]), timeout_s=20)
    req.spec.env["STUB_BEHAVIOUR"] = "hog"
    req.spec.resources.host_memory_bytes = 96 << 20
    inst = await operations.start_instance(running.agent, req)
    assert inst.state == InstanceState.INSTANCE_STATE_RUNNING
    deadline = time.monotonic() + 20
    stored = None
    while time.monotonic() < deadline:
        entry = await store.get(keys.instance_key(running.agent.config.name, iid), types_pb2.Instance)
        stored = entry.value if entry else None  # type: ignore[assignment]
        if stored is not None and stored.state == InstanceState.INSTANCE_STATE_FAILED:
            break
        await asyncio.sleep(0.1)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_FAILED, stored
    assert stored.message.startswith("out of memory (limit 96 MiB)"), stored.message


async def test_runc_lists_every_process_of_the_container(sandboxes: Sandboxes) -> None:
    """``Containers.pids``: what the driver checkpoint of a whole container goes over."""
    box = await sandboxes.start("""
        import json, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(json.dumps({"child": child.pid}), flush=True)
        time.sleep(60)
    """)
    await box.result()
    pids = await sandboxes.runc.pids(box.id)
    assert len(pids) == 2 and pids[0] == box.pid, pids
    parent = await asyncio.to_thread(_parent_pid, pids[1])
    assert parent == box.pid  # host pids: the child's parent is the container's init
    await sandboxes.runc.kill(box.id)
    await box.stopped()
    assert await sandboxes.runc.pids(box.id) == []


def _parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
