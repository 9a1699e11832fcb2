"""The cold-standby tier's page-out on a real swap file: a child process holding 64 MiB of
written anonymous memory is paged out by ``coldstandby.page_out_all`` (the code the node agent
runs), and its ``smaps_rollup`` shows the pages moved to swap; they fault back in intact.

The swap file (128 MiB, on the test's tmp dir) is made, swapped on and, whatever happens,
swapped off and deleted by the ``swap_file`` fixture. It needs root (CI runs as root, and its
machines allow ``swapon``): there a refused ``swapon`` fails the test, saying why."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.nodeagent import coldstandby

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
MIB = 1 << 20
SWAP_MIB, HELD_MIB = 128, 64

CHILD = r"""
import hashlib, os, sys
block = os.urandom(1 << 20)
held = bytearray(block) * int(sys.argv[1])  # written: every page resident and anonymous
print(hashlib.sha256(held).hexdigest(), flush=True)
sys.stdin.readline()  # touch it all again, after the page-out
print(hashlib.sha256(held).hexdigest(), flush=True)
sys.stdin.readline()
"""


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def swap_file(tmp_path: Path) -> Iterator[Path]:
    """A 128 MiB swap file, on for the test; always off and deleted after it."""
    if os.geteuid() != 0:
        pytest.skip("swapon needs root (CI runs this as root)")
    path = tmp_path / "cold.swap"
    on = False
    try:
        made = _run("fallocate", "-l", f"{SWAP_MIB}M", str(path))
        if made.returncode != 0:  # a filesystem without fallocate: write it
            made = _run("dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={SWAP_MIB}")
        assert made.returncode == 0, f"cannot make the swap file: {made.stderr.strip()}"
        path.chmod(0o600)
        mk = _run("mkswap", str(path))
        assert mk.returncode == 0, f"mkswap {path}: {mk.stderr.strip()}"
        sw = _run("swapon", str(path))
        assert sw.returncode == 0, (f"swapon {path} refused ({sw.stderr.strip()}): this machine must allow "
                                    "swap for the cold-standby tier's test")
        on = True
        yield path
    finally:
        if on:
            off = _run("swapoff", str(path))
            if off.returncode != 0:  # say so loudly: the machine is shared
                print(f"swapoff {path} failed: {off.stderr.strip()}", file=sys.stderr)
        path.unlink(missing_ok=True)


def test_a_page_out_moves_a_process_anonymous_memory_to_swap_and_it_comes_back(swap_file: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(HELD_MIB)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        digest = child.stdout.readline().strip()
        assert len(digest) == 64, "the child did not start"
        assert str(swap_file) in Path("/proc/swaps").read_text()
        before = coldstandby.read_smaps(child.pid)
        assert before.pss_anon >= HELD_MIB * MIB and before.swap_pss < 8 * MIB

        result = coldstandby.page_out_all([child.pid])

        after = coldstandby.read_smaps(child.pid)
        assert result.processes == 1 and result.advised_bytes >= HELD_MIB * MIB and not result.cancelled
        assert after.pss_anon <= before.pss_anon - (HELD_MIB - 8) * MIB, (before, after, result)
        assert after.swap_pss >= before.swap_pss + (HELD_MIB - 8) * MIB, (before, after, result)

        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == digest  # faulted back in, the same bytes
        assert coldstandby.read_smaps(child.pid).pss_anon >= HELD_MIB * MIB
    finally:
        child.kill()
        child.wait(10)
