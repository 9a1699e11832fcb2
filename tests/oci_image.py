"""OCI images for tests, built from Debian packages with mmdebstrap and umoci (no registry).

``build_debian_python_image(out)`` makes one OCI layout (and its oci-archive tar) with a tag per
variant, all sharing the Debian base layer (minbase + python3, ~40 s to build) and a layer with
tests/oci_server.py as /srv/server.py; a variant costs only a config:

    serve       python3 /srv/server.py --port 8000, as user nobody in /srv, exposes 8000/tcp,
                SERVED_MODEL_NAME=echo-model
    exits       exits at once with status 3 after printing "exiting at once" to stderr
    no-port     runs forever without opening its port (exposes 8000/tcp all the same)
    no-command  neither Entrypoint nor Cmd (the deploy must fail: "image has no command")

``build_tiny_image(layout, tag, ...)`` makes a small image of a few files in a second, for
tests that need many distinct digests. Run as a script to build into a directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PORT", "SERVED_MODEL", "VARIANTS", "TestImage", "build_debian_python_image", "build_tiny_image",
           "debian_mirror"]

SERVED_MODEL = "echo-model"
PORT = 8000
_SERVER = Path(__file__).with_name("oci_server.py")
_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SERVE = ["--config.entrypoint=python3", "--config.entrypoint=/srv/server.py", "--config.cmd=--port",
          f"--config.cmd={PORT}"]
# Each variant's `umoci config` options over the base tag (which has no Entrypoint or Cmd).
VARIANTS: dict[str, list[str]] = {
    "serve": [*_SERVE, "--config.user=nobody"],
    "exits": ["--config.entrypoint=/bin/sh", "--config.entrypoint=-c",
              "--config.entrypoint=echo 'exiting at once' >&2; exit 3"],
    "no-port": ["--config.entrypoint=python3", "--config.entrypoint=-c",
                "--config.entrypoint=import time; time.sleep(1e9)"],
    "no-command": [],
}
_COMMON = [f"--config.env={_PATH}", f"--config.env=SERVED_MODEL_NAME={SERVED_MODEL}", "--config.env=PYTHONUNBUFFERED=1",
           "--config.workingdir=/srv", f"--config.exposedports={PORT}/tcp"]


@dataclass(frozen=True)
class TestImage:
    """The Debian + python3 test image: one layout, one tag per variant."""

    __test__ = False  # not a test class, whatever its name

    layout: Path
    # The layout as an oci-archive tar (what `skopeo copy ... oci-archive:` writes).
    archive: Path
    # Variant -> manifest digest ("sha256:...").
    digests: dict[str, str]
    served_model: str = SERVED_MODEL
    port: int = PORT

    def ref(self, variant: str = "serve", transport: str = "oci-archive") -> str:
        """The reference text of a variant: ``oci-archive:ARCHIVE:variant`` or ``oci:LAYOUT:variant``."""
        if variant not in self.digests:
            raise KeyError(f"no variant {variant!r}; have {sorted(self.digests)}")
        return f"oci-archive:{self.archive}:{variant}" if transport == "oci-archive" else f"oci:{self.layout}:{variant}"


def debian_mirror(sources: Path = Path("/etc/apt")) -> tuple[str, str]:
    """(mirror URI, suite) of the Debian archive apt uses here: the first source whose suites
    include this system's codename."""
    codename = _os_release().get("VERSION_CODENAME", "bookworm")
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]
    for path in files:
        text = path.read_text() if path.is_file() else ""
        for uris, suites in _sources(text, deb822=path.suffix == ".sources"):
            if codename in suites and uris:
                return uris[0], codename
    return "http://deb.debian.org/debian", codename


def _os_release() -> dict[str, str]:
    text = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
    return {k: v.strip('"') for k, _, v in (line.partition("=") for line in text.splitlines()) if k}


def _sources(text: str, deb822: bool) -> list[tuple[list[str], list[str]]]:
    """(URIs, suites) of each deb (not deb-src) entry of a sources file."""
    if not deb822:
        found = []
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                found.append(([words[1]], [words[2]]))
        return found
    found = []
    for stanza in re.split(r"\n\s*\n", text):
        fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
        if "deb" in fields.get("Types", "").split():
            found.append((fields.get("URIs", "").split(), fields.get("Suites", "").split()))
    return found


def _run(*argv: str | Path, timeout: float = 300) -> None:
    done = subprocess.run([str(a) for a in argv], capture_output=True, timeout=timeout, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv))[:200]} failed ({done.returncode}): "
                           f"{done.stderr.decode(errors='replace')[-2000:]}")


def _build_key() -> str:
    """Changes whenever what goes into the image does."""
    return hashlib.sha256(Path(__file__).read_bytes() + _SERVER.read_bytes()).hexdigest()[:16]


def build_debian_python_image(out: Path) -> TestImage:
    """Builds the test image under ``out`` (reused when ``out`` holds this version's build)."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "stamp.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == _build_key():
        return _image(out, json.loads(stamp.read_text())["digests"])
    layout = out / "layout"
    shutil.rmtree(layout, ignore_errors=True)
    base = out / "base.tar"
    mirror, suite = debian_mirror()
    _run("mmdebstrap", "--quiet", "--variant=minbase", "--include=python3", "--skip=output/dev",
         *[f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "info", "locale")],
         suite, base, mirror, timeout=900)
    _run("umoci", "init", "--layout", layout)
    _run("umoci", "new", "--image", f"{layout}:base")
    _run("umoci", "raw", "add-layer", "--image", f"{layout}:base", base)
    base.unlink()
    _run("umoci", "insert", "--image", f"{layout}:base", _SERVER, "/srv/server.py")
    digests = {}
    for variant, options in VARIANTS.items():
        _run("umoci", "config", "--image", f"{layout}:base", "--tag", variant, *_COMMON, *options)
        digests[variant] = _digest(layout, variant)
    _run("tar", "-C", layout, "-cf", out / "image.tar", ".")
    stamp.write_text(json.dumps({"key": _build_key(), "digests": digests}))
    return _image(out, digests)


def _image(out: Path, digests: dict[str, str]) -> TestImage:
    return TestImage(layout=out / "layout", archive=out / "image.tar", digests=digests)


def _digest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    return next(m["digest"] for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)


def build_tiny_image(layout: Path, tag: str, files: dict[str, bytes], *options: str) -> str:
    """Adds image ``tag`` holding ``files`` (path -> content) to ``layout`` (made if missing),
    with ``umoci config`` ``options``; returns its manifest digest."""
    if not (layout / "index.json").exists():
        _run("umoci", "init", "--layout", layout)
    _run("umoci", "new", "--image", f"{layout}:{tag}")
    staging = layout.parent / f".{layout.name}-{tag}"
    staging.mkdir(exist_ok=True)
    for i, (name, data) in enumerate(files.items()):
        (staging / str(i)).write_bytes(data)
        _run("umoci", "insert", "--image", f"{layout}:{tag}", staging / str(i), name)
    shutil.rmtree(staging)
    _run("umoci", "config", "--image", f"{layout}:{tag}", f"--config.env={_PATH}", *options)
    return _digest(layout, tag)


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TMPDIR", "/tmp")) / "snapwake-test-image"
    print(json.dumps({k: str(v) for k, v in build_debian_python_image(target).__dict__.items()}, indent=1))
