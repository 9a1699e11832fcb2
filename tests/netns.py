"""A private network of "hosts" for tests: network namespaces cabled to a bridge of their own.

``Network(["cp", "n1"]).open()`` makes, as root:

- ``{tag}-br``, a namespace holding only a Linux bridge;
- ``{tag}-{host}`` per host, whose ``eth0`` is a veth cable to that bridge, with an address in a
  /24 of 10.213.0.0/16 that no address or route of this machine uses yet (``.1``, ``.2``, ...);
- one more cable from the launcher's own namespace to the bridge (``.254``), so the test reaches
  every host directly. Nothing else is on this network: a host reaches the others and the test,
  and neither the machine's other interfaces nor the outside world.

``cut(host)`` takes a host's cable down at the bridge (its processes run on, its packets go
nowhere, as when a switch port dies) and ``mend(host)`` brings it back. ``close`` removes every
namespace and link it made, whatever state the test left them in.
"""

from __future__ import annotations

import random
import re
import secrets
import subprocess
from collections.abc import Sequence

__all__ = ["Network"]

_BASE = "10.213"


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _free_subnet() -> str:
    """``10.213.X`` with no address or route of this machine in it."""
    used = _ip("-4", "addr") + _ip("-4", "route")
    taken = {int(x) for x in re.findall(rf"\b{re.escape(_BASE)}\.(\d+)\.", used)}
    free = [x for x in range(1, 255) if x not in taken]
    if not free:
        raise RuntimeError(f"no free /24 in {_BASE}.0.0/16 on this machine")
    return f"{_BASE}.{random.choice(free)}"


class Network:
    """Namespaces ``{tag}-{host}`` on one bridge; ``addresses[host]`` is each one's IPv4."""

    def __init__(self, hosts: Sequence[str]) -> None:
        if any(len(h) > 12 or not h.isalnum() for h in hosts) or "br" in hosts:
            raise ValueError(f"host names must be short and alphanumeric, and not 'br': {hosts}")
        self.tag = "swt-" + secrets.token_hex(3)
        self.subnet = _free_subnet()
        self.addresses = {h: f"{self.subnet}.{i}" for i, h in enumerate(hosts, start=1)}
        self.launcher_address = f"{self.subnet}.254"
        self._uplink = "swt" + self.tag[4:] + "up"  # in the launcher's namespace (15 chars at most)
        self._made: list[str] = []

    def netns(self, host: str) -> str:
        """The ``ip netns`` name of ``host``."""
        return f"{self.tag}-{host}"

    def open(self) -> Network:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        br = self.netns("br")
        self._add_netns(br)
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        for host, address in self.addresses.items():
            ns = self.netns(host)
            self._add_netns(ns)
            # The cable's bridge end is named after the host; its other end is the host's eth0.
            _ip("-n", br, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", br, "link", "set", host, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("link", "add", self._uplink, "type", "veth", "peer", "name", "launcher", "netns", br)
        _ip("-n", br, "link", "set", "launcher", "master", "br0", "up")
        _ip("addr", "add", f"{self.launcher_address}/24", "dev", self._uplink)
        _ip("link", "set", self._uplink, "up")

    def cut(self, host: str) -> None:
        """Unplugs ``host``: its cable goes down at the bridge."""
        _ip("-n", self.netns("br"), "link", "set", host, "down")

    def mend(self, host: str) -> None:
        _ip("-n", self.netns("br"), "link", "set", host, "up")

    def close(self) -> None:
        """Deletes the namespaces (and with them the bridge and every cable); idempotent."""
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
        self._made.clear()
        # Gone with its peer's namespace already; this only covers a build that failed halfway.
        subprocess.run(["ip", "link", "del", self._uplink], capture_output=True, timeout=20)
