"""bench/standby_memory's pure parts: the smaps_rollup and maps parsers."""

from __future__ import annotations

import os

from bench.standby_memory import parse_smaps_rollup, private_ranges, smaps_mib

ROLLUP = """55a0c0de0000-7ffd3b1f2000 ---p 00000000 00:00 0                          [rollup]
Rss:             1048576 kB
Pss:              524288 kB
Pss_Anon:         400000 kB
Pss_File:         124288 kB
Pss_Shmem:             0 kB
Private_Dirty:    400000 kB
Swap:              10240 kB
SwapPss:            5120 kB
Locked:                0 kB
"""

MAPS = """55a0c0de0000-55a0c0de2000 r--p 00000000 08:01 123 /usr/bin/python3
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f0000100000-7f0000200000 ---p 00000000 00:00 0
7f0000200000-7f0000300000 rw-s 00000000 00:05 9 /dev/shm/x
7ffd3b1f0000-7ffd3b1f2000 r--p 00000000 00:00 0                          [vvar]
7ffd3b1f2000-7ffd3b1f4000 r-xp 00000000 00:00 0                          [vdso]
"""


def test_rollup_fields_in_kib_and_missing_ones_zero() -> None:
    got = parse_smaps_rollup(ROLLUP)
    assert got["Rss"] == 1048576 and got["Pss_Anon"] == 400000 and got["SwapPss"] == 5120
    assert parse_smaps_rollup("Rss: 4 kB\n")["Pss_File"] == 0


def test_own_rollup_counts_pss_with_swap() -> None:
    got = smaps_mib(os.getpid())
    assert got["Rss"] > 0 and got["Pss_total"] == round(got["Pss"] + got["SwapPss"], 1)


def test_private_accessible_ranges_only() -> None:
    # Shared, inaccessible (---p) and the kernel's own mappings are left out.
    assert private_ranges(MAPS) == [(0x55A0C0DE0000, 0x2000), (0x7F0000000000, 0x100000)]
