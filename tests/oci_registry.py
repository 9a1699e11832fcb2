"""A real registry for tests: Debian's ``docker-registry`` (distribution 2.8) on loopback, plain
HTTP, with htpasswd users, so the ``docker://`` transport and registry secrets run for real."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import warnings
from pathlib import Path

import httpx

from snapwake.testing import free_port, wait_for

__all__ = ["RegistryProcess"]


def _bcrypt(password: str) -> str:
    """A bcrypt hash (what the registry's htpasswd wants) through libcrypt: the venv has no bcrypt
    package, and Python's crypt module is deprecated (gone in 3.13, when this needs htpasswd)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))  # cheap rounds: tests only


class RegistryProcess:
    """``docker-registry serve`` with its storage in ``data_dir``; ``users`` maps name to password."""

    def __init__(self, data_dir: Path, users: dict[str, str]) -> None:
        self.data_dir, self.users = Path(data_dir), users
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def authfile(self, path: Path, user: str) -> Path:
        """Writes a containers-auth.json for ``user`` at ``path`` (what an operator registers)."""
        token = base64.b64encode(f"{user}:{self.users[user]}".encode()).decode()
        path.write_text(json.dumps({"auths": {self.host: {"auth": token}}}))
        return path

    def push(self, source: str, repo_tag: str, user: str) -> None:
        """Copies ``source`` (skopeo syntax) to ``HOST/repo_tag`` as ``user``."""
        subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                        "--dest-creds", f"{user}:{self.users[user]}", source, f"docker://{self.host}/{repo_tag}"],
                       check=True, capture_output=True, timeout=120)

    def __enter__(self) -> RegistryProcess:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise FileNotFoundError("docker-registry not found: run 'make install' (Debian package docker-registry)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        htpasswd = self.data_dir / "htpasswd"
        htpasswd.write_text("".join(f"{u}:{_bcrypt(p)}\n" for u, p in self.users.items()))
        config = self.data_dir / "config.json"  # YAML is a superset of JSON
        config.write_text(json.dumps({
            "version": 0.1, "log": {"level": "error"},
            "storage": {"filesystem": {"rootdirectory": str(self.data_dir / "storage")}},
            "http": {"addr": self.host}, "auth": {"htpasswd": {"realm": "snapwake-tests", "path": str(htpasswd)}}}))
        self.proc = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda: self.proc is not None and self.proc.poll() is None and _answers(self.host), 20,
                     f"docker-registry on {self.host}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def _answers(host: str) -> bool:
    return httpx.get(f"http://{host}/v2/").status_code == 401
