"""The cold-standby tier's pure parts (``services.nodeagent.coldstandby``): which ranges of a
``/proc/PID/maps`` text are paged out, the idle clock, reading ``/proc/swaps``, the page-out's
refusals counted (not raised), and the container's swap limit while the tier is on."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from services.nodeagent import coldstandby
from services.nodeagent.bundle import BundleSpec, build_config
from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.container import container_limits
from snapwake.v1 import types_pb2

GIB = 1 << 30

MAPS = """\
55d0c0000000-55d0c0001000 r--p 00000000 fd:01 123 /usr/bin/python3.11
55d0c0001000-55d0c0002000 r-xp 00001000 fd:01 123 /usr/bin/python3.11
55d0c0003000-55d0c0004000 rw-p 00003000 fd:01 123 /usr/bin/python3.11
55d0c1000000-55d0c1400000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0004000000 rw-p 00000000 00:00 0
7f0004000000-7f0004001000 ---p 00000000 00:00 0
7f0005000000-7f0005100000 rw-s 00000000 00:05 77 /dev/shm/arena (deleted)
7f0006000000-7f0006100000 rw-p 00000000 00:06 88 /dev/nvidiactl
7f0007000000-7f0007010000 r--p 00000000 fd:01 99 /usr/lib/libcuda.so.580
7f0008000000-7f0008010000 rw-p 00000000 fd:01 98 /tmp/a file with spaces
7f0009000000-7f0009001000 rw-p 00000000 00:00 0                          [anon:glibc malloc]
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
7ffc00100000-7ffc00104000 r--p 00000000 00:00 0                          [vvar]
7ffc00104000-7ffc00106000 r-xp 00000000 00:00 0                          [vdso]
not a mapping line
zz-yy rw-p 00000000 00:00 0
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
"""


def test_pageout_ranges_are_the_private_anonymous_and_written_file_mappings() -> None:
    got = coldstandby.pageout_ranges(MAPS)
    assert got == [
        (0x55D0C0003000, 0x1000),  # the binary's .data: written pages are anonymous copies
        (0x55D0C1000000, 0x400000),  # [heap]
        (0x7F0000000000, 0x4000000),  # an anonymous mmap (malloc arena, the driver's GPU state)
        (0x7F0008000000, 0x10000),  # a writable private file mapping, spaces in its name
        (0x7F0009000000, 0x1000),  # a named anonymous mapping
        (0x7FFC00000000, 0x21000),  # [stack]
    ]
    # Left alone: library code (read-only, shared through the page cache), guard pages, shared
    # memory, device mappings, the kernel's own pseudo-mappings and lines that do not parse.
    starts = {r.start for r in got}
    for kept in (0x55D0C0000000, 0x55D0C0001000, 0x7F0004000000, 0x7F0005000000, 0x7F0006000000,
                 0x7F0007000000, 0x7FFC00100000, 0x7FFC00104000, 0xFFFFFFFFFF600000):
        assert kept not in starts


def test_pageout_ranges_of_a_live_process_cover_its_heap() -> None:
    ranges = coldstandby.pageout_ranges(Path("/proc/self/maps").read_text())
    heap = next(line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith("[heap]"))
    start = int(heap.split("-")[0], 16)
    assert any(r.start == start for r in ranges) and all(r.length > 0 for r in ranges)


@pytest.mark.parametrize(("text", "devices"), [
    ("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n", 0),
    ("", 0),
    ("Filename\tType\tSize\tUsed\tPriority\n/swapfile  file  131068  0  -2\n\n", 1),
    ("Filename\tType\tSize\tUsed\tPriority\n/dev/vdb partition 1 0 -2\n/swap2 file 1 0 -3\n", 2),
])
def test_swap_devices_counts_the_lines_under_the_header(text: str, devices: int) -> None:
    assert coldstandby.swap_devices(text) == devices


@pytest.mark.parametrize(("since", "now", "after", "want"), [
    (100.0, 200.0, 0.0, False),  # the tier is off
    (0.0, 200.0, 30.0, False),  # not parked
    (100.0, 129.9, 30.0, False),  # parked, not long enough
    (100.0, 130.0, 30.0, True),
    (100.0, 1000.0, 30.0, True),
])
def test_the_idle_clock(since: float, now: float, after: float, want: bool) -> None:
    assert coldstandby.due(since, now, after) is want


def test_a_page_out_of_a_gone_process_counts_the_refusal_and_raises_nothing() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    result = coldstandby.page_out_all([child.pid])  # reaped: its pid names nothing now
    assert result.processes == 0 and result.advised_bytes == 0 and not result.cancelled
    assert sum(result.errors.values()) == 1 and next(iter(result.errors)).startswith("pidfd_open:")


@pytest.mark.parametrize(("text", "path", "want"), [
    ("0::/snapwake/i-1\n", "/snapwake/i-1", True),
    ("0::/snapwake/i-1/sub\n", "/snapwake/i-1", True),  # a child cgroup of the container's
    ("0::/snapwake/i-10\n", "/snapwake/i-1", False),  # a prefix of another name is not it
    ("4:memory:/snapwake/i-1\n1:cpu:/\n", "snapwake/i-1/", True),  # v1: one line per controller
    ("4:memory:/process_api/x\n0::/\n", "/snapwake/i-1", False),
    ("", "/snapwake/i-1", False),
])
def test_in_cgroup(text: str, path: str, want: bool) -> None:
    assert coldstandby.in_cgroup(text, path) is want


def test_a_process_outside_the_cgroup_is_left_alone() -> None:
    result = coldstandby.page_out_all([os.getpid()], cgroup="/snapwake/i-not-me")
    assert result.errors == {"not in the container's cgroup": 1} and result.advised_bytes == 0


def test_a_cancelled_page_out_advises_nothing() -> None:
    cancel = threading.Event()
    cancel.set()
    result = coldstandby.page_out_all([os.getpid()], cancel)
    assert result.cancelled and result.advised_bytes == 0 and result.ranges == 0


def test_read_smaps_of_a_live_and_a_gone_process() -> None:
    mine = coldstandby.read_smaps(os.getpid())
    assert mine.pss > 0 and 0 < mine.pss_anon <= mine.pss
    assert coldstandby.read_smaps(2**22 + 12345) == (0, 0, 0)  # above any pid_max: no such process


def _config(tmp_path: Path, **kw: object) -> NodeAgentConfig:
    return NodeAgentConfig(state_dir=str(tmp_path), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("after", "swap"), [(0.0, 0), (300.0, 26 * GIB)])
def test_containers_may_swap_their_memory_limit_only_while_the_tier_is_on(
        tmp_path: Path, after: float, swap: int) -> None:
    spec = types_pb2.FunctionSpec(resources=types_pb2.Resources(gpu_memory_bytes=10 * GIB))
    spec.policy.snapshot_mode = types_pb2.SNAPSHOT_MODE_PROCESS
    limits = container_limits(_config(tmp_path, cold_standby_after_s=after), spec, True)
    assert (limits.memory_bytes, limits.swap_bytes) == (26 * GIB, swap)
    memory = build_config(BundleSpec((), {}, "/", "h", limits=limits))["linux"]["resources"]["memory"]
    # OCI's swap is memory plus swap: runc writes memory.swap.max = swap - limit.
    assert memory == ({"limit": 26 * GIB, "swap": 52 * GIB} if swap else {"limit": 26 * GIB})


def test_negative_tier_settings_are_refused(tmp_path: Path) -> None:
    bad = _config(tmp_path, cold_standby_after_s=-1.0).validate()
    assert any(b.startswith("cold_standby_after_s") and "negative" in b for b in bad)
    assert not any(b.startswith("cold_standby") for b in _config(tmp_path, cold_standby_after_s=60.0).validate())


def test_the_cli_shows_a_cold_standby() -> None:
    from snapwake import cli
    from snapwake.v1 import scheduler_pb2

    resp = scheduler_pb2.ListInstancesResponse(instances=[
        types_pb2.Instance(id="i-1", state=types_pb2.INSTANCE_STATE_STANDBY, standby_tier=types_pb2.STANDBY_TIER_COLD),
        types_pb2.Instance(id="i-2", state=types_pb2.INSTANCE_STATE_STANDBY, standby_tier=types_pb2.STANDBY_TIER_HOT)])
    header, rows = cli._rows("instances", resp)
    states = [row[header.index("STATE")] for row in rows]
    assert states == ["STANDBY (cold)", "STANDBY"]
