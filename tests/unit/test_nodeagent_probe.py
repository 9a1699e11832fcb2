"""Host memory from /proc/PID/smaps_rollup: RSS, PSS and private bytes, and when the agent
rewrites them."""

from __future__ import annotations

import os

import pytest

from services.nodeagent.agent import _note_memory
from services.nodeagent.probe import HostMemory, host_memory, parse_smaps_rollup
from snapwake.v1 import types_pb2

# A standby-like process: most of its RSS is library pages it shares with its siblings.
SAMPLE = """\
55b3212fc000-7fff1b0ab000 ---p 00000000 00:00 0                          [rollup]
Rss:             2097152 kB
Pss:              819200 kB
Pss_Dirty:        500000 kB
Pss_Anon:         500000 kB
Pss_File:         319200 kB
Pss_Shmem:             0 kB
Shared_Clean:    1363148 kB
Shared_Dirty:          0 kB
Private_Clean:     34004 kB
Private_Dirty:    700000 kB
Referenced:      2097152 kB
Anonymous:        700000 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
"""
MIB = 1 << 20


def test_parses_rss_pss_and_private() -> None:
    mem = parse_smaps_rollup(SAMPLE)
    assert mem == HostMemory(rss=2048 * MIB, pss=800 * MIB, private=(34004 + 700000) * 1024)


@pytest.mark.parametrize(("text", "needle"), [
    ("header\nRss: 10 kB\nPss: 5 kB\nPrivate_Clean: 1 kB\n", "no Private_Dirty"),
    ("header\nRss: lots\n", "cannot read line 'Rss: lots'"),
    ("header\nRss: 10 MB\n", "cannot read line"),
    ("", "no Rss, Pss, Private_Clean, Private_Dirty"),
])
def test_bad_text_is_named(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_smaps_rollup(text)


def test_a_live_process_has_pss_and_private_within_rss() -> None:
    mem = host_memory(os.getpid())
    assert mem.rss > 0 and 0 < mem.pss <= mem.rss and 0 < mem.private <= mem.pss


def test_a_gone_process_reads_zero() -> None:
    assert host_memory(2**22 + 7) == HostMemory(0, 0, 0)  # above the kernel's pid_max limit


@pytest.mark.parametrize(("before", "mem", "changed"), [
    ((0, 0, 0), HostMemory(100 * MIB, 60 * MIB, 40 * MIB), True),
    ((100 * MIB, 60 * MIB, 40 * MIB), HostMemory(110 * MIB, 70 * MIB, 50 * MIB), False),
    ((100 * MIB, 60 * MIB, 40 * MIB), HostMemory(100 * MIB, 60 * MIB, 57 * MIB), True),  # private alone
    ((100 * MIB, 60 * MIB, 40 * MIB), HostMemory(100 * MIB, 40 * MIB, 40 * MIB), True),  # PSS falls
])
def test_memory_is_rewritten_past_16_mib(before: tuple[int, int, int], mem: HostMemory, changed: bool) -> None:
    inst = types_pb2.Instance(host_rss_bytes=before[0], host_pss_bytes=before[1], host_private_bytes=before[2])
    assert _note_memory(inst, mem) is changed
    want = tuple(mem) if changed else before
    assert (inst.host_rss_bytes, inst.host_pss_bytes, inst.host_private_bytes) == want
