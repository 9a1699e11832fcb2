"""Helpers for tests and the dev launcher: free ports, real etcd processes (one member or a
cluster of them), readiness waits."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from snapwake import etcdauth
from snapwake.etcd import EtcdTls
from snapwake.pki import Identity, create_ca, issue

__all__ = ["ETCD_ROOT", "EtcdCluster", "EtcdProcess", "free_port", "free_ports", "tls_files", "wait_for"]

# The operator identity tests and the dev cluster run ``snapwake.etcdauth`` with (an etcd root).
ETCD_ROOT = Identity("admin", "etcd-root")


def tls_files(pki: Path, identity: Identity, hosts: Sequence[str] = ()) -> EtcdTls:
    """``identity``'s certificate from the CA in ``pki`` (created, both, when absent) as the
    etcd client settings; the files are reused once they exist."""
    ca = create_ca(pki)
    stem = f"{identity.role}-{identity.name}"
    cert, key = pki / f"{stem}.crt", pki / f"{stem}.key"
    if not (cert.exists() and key.exists()):
        issue(ca, pki, identity, hosts=hosts)
    return EtcdTls(str(ca.cert_path), str(cert), str(key))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (each held until all are picked: ``free_port`` may repeat)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Polls ``check`` until it is true; raises TimeoutError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s")


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class EtcdProcess:
    """A real etcd member with its data in ``data_dir``, on loopback unless ``host`` names another
    address: a single-member cluster by default, or one member of ``initial_cluster``
    (``name=http://HOST:peer,...``); ``wrapper`` goes before its command line (``nsenter
    --net=...``, say).

    With ``pki`` (a folder holding, or getting, the CA of ``snapwake.pki``) it serves clients
    over TLS only and requires a client certificate of that CA (``--client-cert-auth``, whose
    common name etcd takes as the user once ``enable_auth`` ran); a member of a cluster talks
    to its peers with mutual TLS too. Without, plaintext, as the session-wide test etcd."""

    def __init__(self, data_dir: Path, client_port: int = 0, log_path: Path | None = None,
                 host: str = "127.0.0.1", wrapper: Sequence[str] = (), *,
                 name: str = "snapwake", peer_port: int = 0, initial_cluster: str = "",
                 pki: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.name = name
        self.pki = Path(pki) if pki is not None else None
        self.scheme = "https" if pki is not None else "http"
        # Peers over mutual TLS in a cluster; a single member (``make run``'s, whose data dir
        # outlives its flags) keeps its peer URL as it was registered, on its own host.
        self.peer_scheme = self.scheme if initial_cluster else "http"
        self.initial_cluster = initial_cluster or f"{name}={self.peer_scheme}://{host}:{self.peer_port}"
        self.log_path = log_path or self.data_dir.with_suffix(".log")
        self.host, self.wrapper = host, tuple(wrapper)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.client_port}"

    def client_tls(self, identity: Identity = ETCD_ROOT) -> EtcdTls:
        """A client certificate of this etcd's CA for ``identity`` (default: the etcd root)."""
        if self.pki is None:
            raise ValueError("this etcd runs without TLS")
        return tls_files(self.pki, identity)

    def enable_auth(self, users: Sequence[Identity] = ()) -> None:
        """Runs the auth bootstrap (``snapwake.etcdauth``) as the etcd root."""
        etcdauth.bootstrap(self.address, self.client_tls(), users)

    def _tls_args(self) -> list[str]:
        if self.pki is None:
            return []
        files = tls_files(self.pki, Identity("etcd", self.name), hosts=[self.host])
        client = ["--trusted-ca-file", files.ca, "--cert-file", files.cert, "--key-file", files.key,
                  "--client-cert-auth"]
        if self.peer_scheme != "https":
            return client
        return [*client, "--peer-trusted-ca-file", files.ca, "--peer-cert-file", files.cert,
                "--peer-key-file", files.key, "--peer-client-cert-auth"]

    def spawn(self) -> None:
        """Starts the process without waiting (members of a cluster wait for each other)."""
        binary = shutil.which("etcd") or "/usr/bin/etcd"
        if not os.path.exists(binary):
            raise FileNotFoundError("etcd not found: run 'make install' (Debian package etcd-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        c = f"{self.scheme}://{self.host}:{self.client_port}"
        p = f"{self.peer_scheme}://{self.host}:{self.peer_port}"
        args = [*self.wrapper, binary, "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", c, "--advertise-client-urls", c,
                "--listen-peer-urls", p, "--initial-advertise-peer-urls", p,
                "--initial-cluster", self.initial_cluster, *self._tls_args(),
                "--logger", "zap", "--log-level", "warn"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                     start_new_session=True,
                                     env={**os.environ, "ETCD_UNSUPPORTED_ARCH": os.environ.get(
                                         "ETCD_UNSUPPORTED_ARCH", "")})
        log.close()

    def wait_ready(self, timeout: float = 20.0) -> None:
        wait_for(lambda: self.proc is not None and self.proc.poll() is None and _port_open(self.host, self.client_port),
                 timeout, f"etcd on {self.address}")

    def start(self, timeout: float = 20.0) -> EtcdProcess:
        self.spawn()
        self.wait_ready(timeout)
        return self

    def kill(self) -> None:
        """SIGKILL, as a machine that dies: nothing is flushed or said goodbye to."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> EtcdProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EtcdCluster:
    """``size`` etcd members on loopback forming one cluster, each with its own data dir; with
    ``pki``, over TLS with client certificates (see ``EtcdProcess``)."""

    def __init__(self, data_root: Path, size: int = 3, pki: Path | None = None) -> None:
        ports = free_ports(2 * size)
        peers, clients = ports[:size], ports[size:]
        scheme = "https" if pki is not None else "http"
        initial = ",".join(f"m{i}={scheme}://127.0.0.1:{port}" for i, port in enumerate(peers))
        self.members = [EtcdProcess(Path(data_root) / f"m{i}", clients[i], Path(data_root) / f"m{i}.log",
                                    name=f"m{i}", peer_port=port, initial_cluster=initial, pki=pki)
                        for i, port in enumerate(peers)]

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.address for m in self.members)

    def client_tls(self, identity: Identity = ETCD_ROOT) -> EtcdTls:
        return self.members[0].client_tls(identity)

    def enable_auth(self, users: Sequence[Identity] = ()) -> None:
        etcdauth.bootstrap(",".join(self.endpoints), self.client_tls(), users)

    def etcdctl(self, identity: Identity = ETCD_ROOT) -> list[str]:
        """``etcdctl`` with every member and, over TLS, ``identity``'s certificate."""
        scheme = self.members[0].scheme
        flags = ["etcdctl", "--endpoints", ",".join(f"{scheme}://{e}" for e in self.endpoints)]
        if self.members[0].pki is not None:
            tls = self.client_tls(identity)
            flags += ["--cacert", tls.ca, "--cert", tls.cert, "--key", tls.key]
        return flags

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        try:
            for member in self.members:
                member.spawn()
            for member in self.members:
                member.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def etcd(tmp: Path) -> Iterator[EtcdProcess]:
    with EtcdProcess(tmp / "etcd") as proc:
        yield proc
