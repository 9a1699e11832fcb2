"""The cold-standby tier: a standby parked past ``cold_standby_after_s`` is paged out to swap.

A checkpointed standby holds its CUDA context and CPU state in host memory (1710 MB PSS for a
small model's PROCESS standby on the H100) though nothing touches it until its next restore. With
a swap device on the node, ``process_madvise(pidfd, ranges, MADV_PAGEOUT)`` over each of its
container's processes writes those pages out (measured on the H100: 182 MB left resident, of
which 160 MB are library pages shared by every standby, 1457 MB in swap). Its restore needs no
special step: the pages fault back in (0.90 s to the first token instead of 0.41 s there).

What is paged out: the private mappings of every process in the container's cgroup, read from
``/proc/PID/maps`` (``pageout_ranges``): anonymous ones (heap, stacks, malloc arenas, the
driver's copy of the GPU state) and writable file-backed ones (their written pages are anonymous
copies). Read-only file mappings (library code, shared by every standby through the page cache)
and device mappings are left alone; the kernel itself skips pages another process maps too. One
range per call: the kernel stops a call at the first range it refuses, so one refusal would leave
the rest unadvised. Ranges are advised in pieces of at most ``_PIECE`` bytes, and the work stops
between pieces once the standby is being restored (``cancel``), so a restore never waits for
more than one piece.

The node agent (``NodeAgent.cold_pass``) pages out at most one standby at a time, off the event
loop; errors are logged and counted, never fatal (the standby stays hot). Without swap
(``/proc/swaps`` lists none) the tier does nothing and says why once. The container's cgroup must
let it swap: ``container.container_limits`` sets ``memory.swap.max`` to its memory limit while the
tier is on (without that the kernel keeps the pages: swap.max 0 forbids it, and runc leaves an
unset swap.max unbounded, which the tier must not rely on).

Host memory (``hostmem``) counts a cold standby at what it keeps resident (PSS of its container's
processes, re-read from ``smaps_rollup`` after the page-out) instead of its admission estimate.
A restore brings the pages back into memory for the moments before the driver moves the GPU
state onto the GPU; the node's ``standby_host_memory_fraction`` leaves room for that.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from snapwake import telemetry

__all__ = ["HOT", "COLD", "ColdStandbyMetrics", "PageOut", "Range", "SmapsMemory", "due", "in_cgroup", "page_out",
           "page_out_all", "pageout_ranges", "read_smaps", "swap_devices"]

log = logging.getLogger(__name__)

# Tier names, as labels and in logs.
HOT, COLD = "hot", "cold"

MADV_PAGEOUT = 21
# The same numbers on x86_64 and arm64 (the generic syscall table since Linux 5.x).
_SYS_PIDFD_OPEN = 434
_SYS_PROCESS_MADVISE = 440
# The most bytes one process_madvise call advises: the cancel check runs between pieces.
_PIECE = 256 << 20
# The most ranges advised per process (the kernel allows ~65530 mappings by default).
_MAX_RANGES = 1 << 16
# Pseudo-mappings the kernel refuses to advise (or that are not memory of the process).
_SPECIAL = frozenset({"[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]"})


class Range(NamedTuple):
    """One address range of a process, ``length`` bytes from ``start``."""

    start: int
    length: int


def pageout_ranges(maps: str) -> list[Range]:
    """The ranges of a ``/proc/PID/maps`` text that the page-out advises: private, accessible,
    and anonymous (no path, ``[heap]``, ``[stack]``, ``[anon:...]``) or writable and
    file-backed; not the kernel's special mappings nor device files. Malformed lines are
    skipped (the text comes from the kernel, but a process may map a file with any name)."""
    out: list[Range] = []
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5:
            continue
        span, perms = parts[0], parts[1]
        if len(perms) != 4 or perms[3] != "p" or perms[:3] == "---":
            continue
        name = parts[5].strip() if len(parts) > 5 else ""
        if name in _SPECIAL or name.startswith("/dev/"):
            continue
        anonymous = name == "" or (name.startswith("[") and name.endswith("]"))
        if not anonymous and perms[1] != "w":
            continue
        start_s, sep, end_s = span.partition("-")
        try:
            start, end = int(start_s, 16), int(end_s, 16)
        except ValueError:
            continue
        if sep and end > start:
            out.append(Range(start, end - start))
    return out


def in_cgroup(proc_cgroup: str, path: str) -> bool:
    """Whether a ``/proc/PID/cgroup`` text puts the process in cgroup ``path`` (or below it), in
    any hierarchy (v1 lists one line per controller, v2 one ``0::`` line)."""
    path = "/" + path.strip("/")
    for line in proc_cgroup.splitlines():
        where = line.split(":", 2)[-1] if line.count(":") >= 2 else ""
        if where == path or where.startswith(path + "/"):
            return True
    return False


def swap_devices(swaps: str) -> int:
    """The swap devices a ``/proc/swaps`` text lists (its first line is the header)."""
    return sum(1 for line in swaps.splitlines()[1:] if line.strip())


def due(standby_since: float, now: float, after_s: float) -> bool:
    """Whether a standby parked since ``standby_since`` (0: not parked) is due for the cold tier
    at ``now``, with the tier's threshold ``after_s`` (0: the tier is off)."""
    return after_s > 0 and standby_since > 0 and now - standby_since >= after_s


@dataclass
class PageOut:
    """What one page-out did."""

    processes: int = 0
    ranges: int = 0
    # Bytes the kernel accepted the advice for (not all of them need have been resident).
    advised_bytes: int = 0
    # errno text -> calls that failed with it (a process gone, a range refused).
    errors: dict[str, int] = field(default_factory=dict)
    cancelled: bool = False
    seconds: float = 0.0

    def error(self, why: str) -> None:
        self.errors[why] = self.errors.get(why, 0) + 1


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def page_out(pid: int, result: PageOut, cancel: threading.Event | None = None, cgroup: str = "") -> None:
    """Advises ``MADV_PAGEOUT`` over ``pid``'s ``pageout_ranges``, adding to ``result``; stops
    between pieces once ``cancel`` is set. With ``cgroup``, a process not in it (its pid reused
    since the container's were listed) is left alone. Never raises for the process or the
    kernel: what failed is counted in ``result.errors``."""
    libc = _libc()
    # The pidfd first: the checks below then name the process it holds, not a later one.
    pidfd = libc.syscall(_SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0))
    if pidfd < 0:
        result.error(f"pidfd_open: {os.strerror(ctypes.get_errno())}")
        return
    try:
        try:
            if cgroup and not in_cgroup(Path(f"/proc/{pid}/cgroup").read_text(), cgroup):
                result.error("not in the container's cgroup")
                return
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError as exc:
            result.error(f"maps: {exc.strerror or exc}")
            return
        result.processes += 1
        ranges = pageout_ranges(maps)
        if len(ranges) > _MAX_RANGES:
            result.error(f"more than {_MAX_RANGES} mappings")
        for start, length in ranges[:_MAX_RANGES]:
            result.ranges += 1
            for offset in range(0, length, _PIECE):
                if cancel is not None and cancel.is_set():
                    result.cancelled = True
                    return
                iov = _Iovec(start + offset, min(_PIECE, length - offset))
                n = libc.syscall(_SYS_PROCESS_MADVISE, ctypes.c_int(pidfd), ctypes.byref(iov), ctypes.c_size_t(1),
                                 ctypes.c_int(MADV_PAGEOUT), ctypes.c_uint(0))
                if n < 0:
                    result.error(os.strerror(ctypes.get_errno()))
                    break  # the rest of this range is refused the same way
                result.advised_bytes += n
    finally:
        os.close(pidfd)


def page_out_all(pids: Iterable[int], cancel: threading.Event | None = None, cgroup: str = "") -> PageOut:
    """``page_out`` over each of ``pids`` (a container's processes, in ``cgroup`` when given),
    stopping once ``cancel`` is set. Blocks for as long as the kernel writes to swap: call it
    off the event loop."""
    result, t0 = PageOut(), time.monotonic()
    for pid in pids:
        if cancel is not None and cancel.is_set():
            result.cancelled = True
            break
        page_out(pid, result, cancel, cgroup)
    result.seconds = time.monotonic() - t0
    return result


class SmapsMemory(NamedTuple):
    """The parts of ``/proc/PID/smaps_rollup`` the tier reads, in bytes."""

    pss: int
    pss_anon: int
    swap_pss: int


def read_smaps(pid: int) -> SmapsMemory:
    """``pid``'s PSS, anonymous PSS and swapped-out PSS (zeros when it is gone or the kernel
    reports none of them)."""
    kib: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return SmapsMemory(0, 0, 0)
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields = rest.split()
        if name in ("Pss", "Pss_Anon", "SwapPss") and fields and fields[0].isdigit():
            kib[name] = int(fields[0])
    return SmapsMemory(kib.get("Pss", 0) << 10, kib.get("Pss_Anon", 0) << 10, kib.get("SwapPss", 0) << 10)


class ColdStandbyMetrics:
    """The tier's metrics, in their own registry (several agents can live in one test process);
    ``server.serve`` adds it to the node's ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.pageouts = Counter("snapwake_nodeagent_standby_pageouts",
                                "Standby page-outs to swap (cold tier), by result: ok, error, cancelled.",
                                ["result"], registry=self.registry)
        self.pageout_bytes = Counter("snapwake_nodeagent_standby_pageout_bytes",
                                     "Bytes advised MADV_PAGEOUT by completed standby page-outs.",
                                     registry=self.registry)
        self.cold = Gauge("snapwake_nodeagent_cold_standbys", "Standbys paged out to swap now.",
                          registry=self.registry)
        self.restore = Histogram("snapwake_nodeagent_restore_seconds",
                                 "Restore of a standby to ready, by the tier it was in (hot, cold).",
                                 ["tier"], buckets=telemetry.LATENCY_BUCKETS, registry=self.registry)
