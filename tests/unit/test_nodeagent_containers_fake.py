"""FakeContainers.pids: the subprocess and what it started (its session), nothing else."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from services.nodeagent.containers import FakeContainers


async def test_fake_pids_are_the_process_and_its_children(tmp_path: Path) -> None:
    program = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']);"
               "print('up', flush=True); time.sleep(30)")
    (tmp_path / "config.json").write_text(json.dumps({"process": {"args": [sys.executable, "-c", program],
                                                                   "env": [], "cwd": str(tmp_path)}}))
    containers = FakeContainers()
    log = tmp_path / "out.log"
    pid = await containers.run("sw-a", tmp_path, log)
    try:
        for _ in range(200):
            if "up" in log.read_text() and len(await containers.pids("sw-a")) == 2:
                break
            await asyncio.sleep(0.05)
        pids = await containers.pids("sw-a")
        assert pids[0] == pid and len(pids) == 2, pids
    finally:
        await containers.delete("sw-a")
    assert await containers.pids("sw-a") == []
    assert await containers.pids("sw-unknown") == []
