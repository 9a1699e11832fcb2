"""An instance's output.log against hostile instance dirs: no symlink (at the file or its
directory) is followed, no FIFO blocks a read, and what a container writes is capped by
rotation. Real files, real pipes, real subprocesses (``FakeContainers``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest

from services.nodeagent import logs
from services.nodeagent.containers.fake import FakeContainers
from snapwake import errors

SHADOW = Path("/etc/shadow")


@pytest.fixture
def idir(tmp_path: Path) -> Path:
    path = tmp_path / "i-00000000abcd"
    path.mkdir(mode=0o755)
    return path


def test_a_symlinked_log_pointing_at_etc_shadow_is_never_read_or_written(
        idir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    os.symlink(SHADOW, idir / "output.log")
    with caplog.at_level(logging.WARNING, logger="services.nodeagent.logs"):
        assert logs.tail(idir / "output.log", 1 << 20) == ""
    assert any("symlinks are refused" in r.getMessage() for r in caplog.records)
    with pytest.raises(errors.InvalidArgument, match="output.log: .*symlinks are refused"):
        logs.LogRelay(idir / "output.log")
    # The same for a decoy whose bytes we know: neither read back nor appended to.
    decoy = tmp_path / "secret"
    decoy.write_text("root:$6$hash\n")
    os.unlink(idir / "output.log")
    os.symlink(decoy, idir / "output.log")
    assert logs.tail(idir / "output.log") == ""
    with pytest.raises(errors.InvalidArgument):
        logs.LogRelay(idir / "output.log")
    assert decoy.read_text() == "root:$6$hash\n"


def test_a_rotated_log_planted_as_a_symlink_is_not_read(idir: Path, tmp_path: Path) -> None:
    (idir / "output.log").write_text("recent\n")
    decoy = tmp_path / "secret"
    decoy.write_text("secret\n")
    os.symlink(decoy, idir / "output.log.1")
    assert logs.tail(idir / "output.log", 4096) == ""  # refused whole, and logged


def test_a_symlinked_instance_dir_is_refused(idir: Path, tmp_path: Path) -> None:
    (idir / "output.log").write_text("hello\n")
    os.symlink(idir, tmp_path / "link")
    assert logs.tail(tmp_path / "link" / "output.log") == ""
    assert logs.tail(idir / "output.log") == "hello\n"
    with pytest.raises(errors.InvalidArgument, match="log directory .*link: .*symlinks are refused"):
        logs.LogRelay(tmp_path / "link" / "output.log")


def test_a_world_writable_instance_dir_is_refused(idir: Path) -> None:
    os.chmod(idir, 0o777)
    with pytest.raises(errors.InvalidArgument, match="not writable by others"):
        logs.LogRelay(idir / "output.log")


def test_a_fifo_in_place_of_the_log_does_not_block_a_read(idir: Path) -> None:
    os.mkfifo(idir / "output.log")
    began = time.monotonic()
    assert logs.tail(idir / "output.log") == ""
    assert time.monotonic() - began < 1
    with pytest.raises(errors.InvalidArgument, match="output.log: No such device"):  # no writer blocks either
        logs.LogRelay(idir / "output.log")


def test_no_log_yet_is_empty(idir: Path) -> None:
    assert logs.tail(idir / "output.log") == ""


async def test_what_a_container_writes_is_capped_by_rotation(idir: Path) -> None:
    """A container writes 200 lines of 1 KiB (200 KiB) through the relay capped at 16 KiB: at
    most two files of 16 KiB stay, and the tail holds the newest lines in order."""
    script = "import sys\nfor n in range(200):\n    sys.stdout.write(f'{n:05d} ' + 'x' * 1017 + '\\n')\n"
    bundle = idir / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"process": {"args": [sys.executable, "-c", script],
                                                                "env": ["PATH=/usr/bin:/bin"]}}))
    containers = FakeContainers(prefix="lg-", log_max_bytes=16 << 10)
    await containers.run("lg-1", bundle, idir / "output.log")
    try:
        for _ in range(400):  # 20 s at most
            if "\n00199 " in logs.tail(idir / "output.log", 4096):
                break
            await asyncio.sleep(0.05)
    finally:
        await containers.kill("lg-1", "KILL")
        await containers.delete("lg-1")
    assert (idir / "output.log").stat().st_size <= 16 << 10
    assert (idir / "output.log.1").stat().st_size == 16 << 10
    assert not (idir / "output.log.2").exists()
    got = logs.tail(idir / "output.log", 20 << 10).splitlines()
    numbers = [int(line[:5]) for line in got]
    assert numbers == list(range(numbers[0], 200)) and len(numbers) >= 18  # spans both files, in order
