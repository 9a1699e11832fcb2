"""User images built from this machine's own Python environment, as an OCI layout (umoci).

The GPU machine has no Docker, no registry and no network, but it has a Python environment with
torch and transformers. ``build_host_python_image`` packs that environment into one image
layer the way a slim user image would hold it: the base interpreter and its standard library,
``/bin/sh``, the shared libraries that the interpreter and every kept extension module link
(their ``ldd`` closure, not all of ``/usr``: the CUDA toolkit under ``/usr/local`` and the
rest of the host stay out), the merged-usr links (``/bin``, ``/lib``, ``/lib64``),
``/etc/passwd``, ``/etc/group`` and ``/etc/ld.so.cache``, and the virtual environment at its
own path (so its scripts' ``#!`` lines work), with only the chosen site-packages (an
allow-list, or all but a deny-list) plus wheels installed on top. No driver library goes in:
the node gives the driver, as the NVIDIA container toolkit does.

GNU tar writes the layer (fast, and it keeps hard links and modes); ``umoci raw add-layer``
adds it (umoci 0.4.7 gzips it) and ``umoci config`` sets the entrypoint, cmd and env.

    python -m bench.hostimage LAYOUT TAG --keep cuda --keep cuda_bindings --config.cmd=...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

__all__ = ["build_host_python_image"]

_ETC = ("etc/passwd", "etc/group", "etc/ld.so.cache", "etc/ld.so.conf")
_TOOLS = ("/bin/sh", "/usr/bin/env")
_GLIBC = ("libc.so.*", "libm.so.*", "libdl.so.*", "libpthread.so.*", "librt.so.*", "libresolv.so.*",
          "libutil.so.*", "libnss_*.so.*", "libanl.so.*", "ld-linux*.so.*")


def _elves(roots: Iterable[Path]) -> list[Path]:
    """Shared objects under ``roots`` (files named *.so or *.so.N)."""
    found = []
    for root in roots:
        paths = [root] if root.is_file() else root.rglob("*") if root.is_dir() else []
        found += [p for p in paths if p.is_file() and not p.is_symlink() and (p.suffix == ".so" or ".so." in p.name)]
    return found


def _closure(binaries: Sequence[Path]) -> set[Path]:
    """Every library ``binaries`` link, as ``ldd`` resolves them (with the links that name them)."""
    libs: set[Path] = set()
    for start in range(0, len(binaries), 200):
        done = subprocess.run(["ldd", *map(str, binaries[start:start + 200])], capture_output=True, text=True,
                              timeout=300, check=False)
        for line in done.stdout.splitlines():
            parts = line.split()
            path = parts[2] if len(parts) >= 3 and parts[1] == "=>" else parts[0] if parts and parts[0].startswith("/") else ""
            if path.startswith("/") and Path(path).exists():
                named = Path(path)
                libs.add(Path(named.parent.resolve(), named.name))  # the name ldd found (often a link)
                libs.add(named.resolve())
    return libs


def _distinct(names: Iterable[str]) -> list[str]:
    """``names`` without repeats and without those inside another named dir (tar would store
    a repeat as a hard link to itself, which umoci cannot unpack for a symlink)."""
    out: list[str] = []
    dirs: set[str] = set()
    for name in sorted(set(names)):
        if any(str(parent) in dirs for parent in Path(name).parents):
            continue
        out.append(name)
        if Path("/", name).is_dir() and not Path("/", name).is_symlink():
            dirs.add(name)
    return out


def _link_chain(path: Path) -> set[Path]:
    """``path`` and every link on the way to the file it names (a venv's python3 -> the base's
    python3 -> python3.12), each with its directory resolved."""
    chain: set[Path] = set()
    for _ in range(40):
        path = Path(path.parent.resolve(), path.name)
        chain.add(path)
        if not path.is_symlink():
            break
        path = path.parent / os.readlink(path)
    return chain


def _system_members(site_entries: Sequence[Path]) -> list[str]:
    """The interpreter, its standard library, the tools and the library closure, as paths
    relative to / (real directories: /lib is a link to usr/lib on merged-usr systems)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    python = Path(sys.executable).resolve()
    tools = [Path(t) for t in _TOOLS if Path(t).exists()]
    binaries = [python, *(t.resolve() for t in tools), *_elves([stdlib / "lib-dynload", *site_entries])]
    paths = {python, stdlib, *_closure(binaries), *_link_chain(Path(sys.prefix, "bin", "python3"))}
    # All of the C library, as any base image holds it: the driver the node binds in later
    # (libcuda) links libdl, librt and libpthread, which nothing here may have pulled in.
    libc = next((p for p in paths if p.name == "libc.so.6"), None)
    if libc is not None:
        for pattern in _GLIBC:
            paths |= {Path(lib.parent.resolve(), lib.name) for lib in libc.parent.glob(pattern)}
    for tool in tools:  # /bin/sh -> dash: the link and its target
        paths |= {Path(tool.parent.resolve(), tool.name), tool.resolve()}
    for link in ("bin", "lib", "lib64", "sbin"):
        if Path("/", link).is_symlink():
            paths.add(Path("/", link))
    names = sorted(str(p.relative_to("/")) for p in paths)
    return names + [e for e in _ETC if Path("/", e).exists()]


def _run(*argv: str | Path, timeout: float = 900) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, timeout=timeout, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv))[:300]} failed ({done.returncode}): "
                           f"{done.stderr.decode(errors='replace')[-2000:]}")
    return done.stdout.decode(errors="replace")


def _matches(entry: str, names: Iterable[str]) -> bool:
    """Whether a site-packages entry belongs to one of ``names`` (a top-level package or module,
    or its dist-info/.libs dir: ``cuda`` matches ``cuda``, ``cuda_bindings-13.0.dist-info``)."""
    stem = entry.removesuffix(".py")
    for name in names:
        if stem == name or entry.startswith((f"{name}-", f"{name}.libs")) or stem.lower() == name.lower():
            return True
    return False


def _site_entries(site: Path, keep: Sequence[str] | None, drop: Sequence[str]) -> list[Path]:
    entries = sorted(site.iterdir())
    if keep is not None:
        return [e for e in entries if _matches(e.name, keep)]
    return [e for e in entries if not _matches(e.name, drop)]


def build_host_python_image(layout: Path, tag: str, *, keep: Sequence[str] | None = None,
                            drop: Sequence[str] = (), wheels: Sequence[Path] = (),
                            files: Mapping[str, bytes] | None = None, config: Sequence[str] = ()) -> dict[str, float]:
    """Adds image ``tag`` to ``layout`` (made if missing): this interpreter's environment with
    the site-packages ``keep`` names (all but ``drop`` when None), ``wheels`` installed into it,
    ``files`` (absolute path -> bytes), and ``umoci config`` options ``config``. Returns the
    build's numbers: seconds per step, layer bytes, and the manifest digest under "digest"."""
    started = time.monotonic()
    prefix, base = Path(sys.prefix), Path(sys.base_prefix)
    site = Path(sysconfig.get_paths()["purelib"])
    work = layout.parent / f".{layout.name}-{tag}-build"
    shutil.rmtree(work, ignore_errors=True)
    stage = work / "stage"
    stage.mkdir(parents=True)
    staged_site = stage / site.relative_to("/")
    staged_site.mkdir(parents=True)
    if wheels:
        _run(sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
             "--target", staged_site, *wheels)
    for path, data in (files or {}).items():
        target = stage / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.chmod(0o755)
    entries = _site_entries(site, keep, drop)
    venv = [prefix / "bin", prefix / "pyvenv.cfg"] if prefix != base else []
    listing = work / "members"
    t = time.monotonic()
    listing.write_text("\n".join(_distinct([*_system_members(entries), *(str(p.relative_to("/")) for p in venv + entries)]))
                       + "\n")
    closure_s = time.monotonic() - t
    layer = work / "layer.tar"
    t = time.monotonic()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve().relative_to("/")
    # The base interpreter's own site-packages and test suite are not the environment's.
    _run("tar", "-C", "/", "-cf", layer, f"--exclude={stdlib}/site-packages", f"--exclude={stdlib}/dist-packages",
         f"--exclude={stdlib}/test", "--files-from", listing)
    # The staged wheels and files go over the host's (same paths: appended entries win).
    _run("tar", "-C", stage, "-rf", layer, *sorted(p.name for p in stage.iterdir()))
    tar_s = time.monotonic() - t
    layer_bytes = layer.stat().st_size
    if not (layout / "index.json").exists():
        _run("umoci", "init", "--layout", layout)
    _run("umoci", "new", "--image", f"{layout}:{tag}")
    t = time.monotonic()
    _run("umoci", "raw", "add-layer", "--image", f"{layout}:{tag}", layer)
    add_s = time.monotonic() - t
    _run("umoci", "config", "--image", f"{layout}:{tag}", *config)
    shutil.rmtree(work, ignore_errors=True)
    index = json.loads((layout / "index.json").read_text())
    digest = next(m["digest"] for m in index["manifests"]
                  if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    blobs = sum(f.stat().st_size for f in (layout / "blobs").rglob("*") if f.is_file())
    return {"digest": digest, "layer_bytes": layer_bytes, "layout_bytes": blobs, "closure_s": closure_s, "tar_s": tar_s,  # type: ignore[dict-item]
            "add_layer_s": add_s, "total_s": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.hostimage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("layout", type=Path)
    p.add_argument("tag")
    p.add_argument("--keep", action="append", help="site-packages to keep (repeatable; default: all)")
    p.add_argument("--drop", action="append", default=[], help="site-packages to leave out (repeatable)")
    p.add_argument("--wheel", action="append", default=[], type=Path)
    opts, config = p.parse_known_args(argv)  # the rest: umoci config options (--config.cmd=...)
    print(json.dumps(build_host_python_image(opts.layout, opts.tag, keep=opts.keep, drop=opts.drop,
                                             wheels=opts.wheel, config=config)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
