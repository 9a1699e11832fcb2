"""The containers' seccomp filter: the containers-common default profile, in the OCI form.

Debian's ``golang-github-containers-common`` ships the profile podman and buildah use
(``/usr/share/containers/seccomp.json``). Its rules carry conditions (``includes``/``excludes``
on architectures, capabilities and kernel versions) that only the engine resolves; ``translate``
resolves them the way containers/common's ``setupSeccomp`` does, for this machine's architecture
and the capabilities our containers keep (none), into ``linux.seccomp`` of config.json.

One deliberate change on top: that profile lets a process without capabilities create
namespaces and mount (podman runs nested containers that way). Docker's default profile does
not, and neither do we: ``NAMESPACE_RULES`` refuses them the way Docker's does (an unprivileged
user namespace is the usual first step of a kernel exploit).
"""

from __future__ import annotations

import functools
import json
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_PROFILE", "NAMESPACE_RULES", "load", "machine_arch", "translate"]

DEFAULT_PROFILE = "/usr/share/containers/seccomp.json"

# uname -m -> (Go's name, used in includes/excludes.arches; libseccomp's, used in archMap).
_ARCHES = {"x86_64": ("amd64", "SCMP_ARCH_X86_64"), "aarch64": ("arm64", "SCMP_ARCH_AARCH64"),
           "ppc64le": ("ppc64le", "SCMP_ARCH_PPC64LE"), "s390x": ("s390x", "SCMP_ARCH_S390X")}

_EPERM, _ENOSYS = 1, 38
# Docker's mask of the CLONE_NEW* flags (user, pid, net, uts, ipc, mount, cgroup) in clone's flags.
_CLONE_NEW_MASK = 0x7E020000
_MOUNT_CALLS = ("mount", "umount", "umount2", "pivot_root", "unshare", "setns", "open_tree",
                "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr")
NAMESPACE_RULES: tuple[dict[str, Any], ...] = (
    {"names": list(_MOUNT_CALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": _EPERM},
    # clone3 passes its flags in memory a filter cannot read: ENOSYS makes glibc fall back to clone.
    {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": _ENOSYS},
    # clone only without namespace flags ((flags & value) == valueTwo); the rest get the default errno.
    {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
     "args": [{"index": 0, "value": _CLONE_NEW_MASK, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
)
_RESTRICTED = set(_MOUNT_CALLS) | {"clone3", "clone"}


def machine_arch(machine: str | None = None) -> tuple[str, str]:
    """(Go arch, libseccomp arch) of ``machine`` (default: this one); ValueError when unknown."""
    name = machine or platform.machine()
    if name not in _ARCHES:
        raise ValueError(f"seccomp: no architecture mapping for {name!r}")
    return _ARCHES[name]


def _kernel(version: str) -> tuple[int, int]:
    major, _, rest = version.partition(".")
    minor = "".join(c for c in rest.split(".")[0] if c.isdigit())
    return int(major), int(minor or 0)


def _applies(rule: dict[str, Any], arch: str, caps: frozenset[str], kernel: tuple[int, int]) -> bool:
    """containers/common's conditions: excludes first, then includes."""
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if arch in (exc.get("arches") or []) or caps & set(exc.get("caps") or []):
        return False
    if exc.get("minKernel") and kernel >= _kernel(exc["minKernel"]):
        return False
    if inc.get("arches") and arch not in inc["arches"]:
        return False
    if inc.get("caps") and not set(inc["caps"]) <= caps:
        return False
    return not (inc.get("minKernel") and kernel < _kernel(inc["minKernel"]))


def _syscall(rule: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"names": list(rule.get("names") or [rule["name"]]), "action": rule["action"]}
    if rule.get("args"):
        out["args"] = [{k: a[k] for k in ("index", "value", "valueTwo", "op")} for a in rule["args"]]
    if rule.get("errnoRet") is not None:
        out["errnoRet"] = rule["errnoRet"]
    return out


def _without(rules: Iterable[dict[str, Any]], names: set[str]) -> list[dict[str, Any]]:
    """``rules`` with ``names`` taken out of every unconditional allow (the errno rules win then)."""
    out = []
    for rule in rules:
        if rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args"):
            rule = {**rule, "names": [n for n in rule["names"] if n not in names]}
            if not rule["names"]:
                continue
        elif rule["action"] == "SCMP_ACT_ALLOW" and set(rule["names"]) & names:
            continue
        out.append(rule)
    return out


def translate(profile: dict[str, Any], *, caps: Iterable[str] = (), machine: str | None = None,
              kernel: str | None = None, confine_namespaces: bool = True) -> dict[str, Any]:
    """The OCI ``linux.seccomp`` object for a containers-common profile (pure)."""
    go_arch, scmp_arch = machine_arch(machine)
    held = frozenset(caps)
    version = _kernel(kernel or platform.release())
    seccomp: dict[str, Any] = {"defaultAction": profile["defaultAction"]}
    if profile.get("defaultErrnoRet") is not None:
        seccomp["defaultErrnoRet"] = profile["defaultErrnoRet"]
    for entry in profile.get("archMap") or []:
        if entry["architecture"] == scmp_arch:
            seccomp["architectures"] = [entry["architecture"], *(entry.get("subArchitectures") or [])]
    if profile.get("flags"):
        seccomp["flags"] = list(profile["flags"])
    rules = [_syscall(r) for r in profile.get("syscalls") or [] if _applies(r, go_arch, held, version)]
    if confine_namespaces and "CAP_SYS_ADMIN" not in held:
        rules = _without(rules, _RESTRICTED) + [dict(r) for r in NAMESPACE_RULES]
    seccomp["syscalls"] = rules
    return seccomp


@functools.lru_cache(maxsize=4)
def load(path: str = DEFAULT_PROFILE) -> dict[str, Any]:
    """The translated profile at ``path`` for containers without capabilities (read once per
    path); OSError or ValueError when it is missing or not a profile."""
    profile = json.loads(Path(path).read_text())
    if not isinstance(profile, dict) or "defaultAction" not in profile:
        raise ValueError(f"{path}: not a seccomp profile (no defaultAction)")
    return translate(profile)
