"""Helpers for tests and the dev launcher: free ports, a real etcd process, readiness waits."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

__all__ = ["EtcdProcess", "free_port", "wait_for"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    """A real single-member etcd with its data in ``data_dir``, on loopback unless ``host`` names
    another address; ``wrapper`` goes before its command line (``nsenter --net=...``, say)."""

    def __init__(self, data_dir: Path, client_port: int = 0, log_path: Path | None = None,
                 host: str = "127.0.0.1", wrapper: Sequence[str] = ()) -> None:
        self.data_dir = Path(data_dir)
        self.client_port = client_port or free_port()
        self.peer_port = free_port()
        self.log_path = log_path or self.data_dir.with_suffix(".log")
        self.host, self.wrapper = host, tuple(wrapper)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.client_port}"

    def start(self, timeout: float = 20.0) -> EtcdProcess:
        binary = shutil.which("etcd") or "/usr/bin/etcd"
        if not os.path.exists(binary):
            raise FileNotFoundError("etcd not found: run 'make install' (Debian package etcd-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        c, p = f"http://{self.host}:{self.client_port}", f"http://{self.host}:{self.peer_port}"
        args = [*self.wrapper, binary, "--name", "snapwake", "--data-dir", str(self.data_dir),
                "--listen-client-urls", c, "--advertise-client-urls", c,
                "--listen-peer-urls", p, "--initial-advertise-peer-urls", p,
                "--initial-cluster", f"snapwake={p}", "--logger", "zap", "--log-level", "warn"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                     start_new_session=True,
                                     env={**os.environ, "ETCD_UNSUPPORTED_ARCH": os.environ.get(
                                         "ETCD_UNSUPPORTED_ARCH", "")})
        log.close()
        wait_for(lambda: self.proc is not None and self.proc.poll() is None and _port_open(self.host, self.client_port),
                 timeout, f"etcd on {self.address}")
        return self

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


@contextlib.contextmanager
def etcd(tmp: Path) -> Iterator[EtcdProcess]:
    with EtcdProcess(tmp / "etcd") as proc:
        yield proc
