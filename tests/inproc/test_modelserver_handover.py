"""The arena round trip on CPU, through the real handover protocol and control socket.

``BlobstoreDouble`` plays the blobstore's side of the handover socket (the real one lives in
services/blobstore/): it keeps the memfd it is handed on ``store`` and hands a duplicate back on
``load``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelserver.__main__ import load_tokenizer
from modelserver.arena import MemfdArena
from modelserver.control import ControlServer
from modelserver.instance import Instance, Phase, Settings
from modelserver.openai import create_app
from modelserver.sampling import SamplingParams
from snapwake.protocols import recv_message, request, send_message
from snapwake.testing import free_port, wait_for


class BlobstoreDouble:
    """A handover server in a thread: ``store`` keeps (manifest, fd), ``load`` hands them back."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.snapshots: dict[str, tuple[dict[str, Any], int]] = {}
        self.mapped: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen()
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                self._one(conn)

    def _one(self, conn: socket.socket) -> None:
        msg, fds = recv_message(conn)
        sid = msg["snapshot_id"]
        if msg["op"] == "store":
            self.snapshots[sid] = (msg["manifest"], fds[0])
            size = int(msg["manifest"]["arena_bytes"])
            digest = hashlib.sha256(json.dumps(msg["manifest"], sort_keys=True).encode()).hexdigest()
            send_message(conn, {"ok": True, "bytes": size, "manifest_digest": digest})
        elif msg["op"] == "load" and sid in self.snapshots:
            manifest, fd = self.snapshots[sid]
            size = int(manifest["arena_bytes"])
            send_message(conn, {"ok": True, "bytes": size, "alloc_bytes": size, "manifest": manifest,
                                "dma_seconds": 0.0}, fds=[os.dup(fd)])
            reply, _ = recv_message(conn)
            self.mapped.append(reply["op"])
        else:
            send_message(conn, {"ok": False, "error": f"unknown snapshot {sid}"})

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        for _, fd in self.snapshots.values():
            os.close(fd)


@pytest.fixture
def blobstore(tmp_path: Path) -> Iterator[BlobstoreDouble]:
    bs = BlobstoreDouble(str(tmp_path / "handover.sock"))
    yield bs
    bs.close()


def _greedy(inst: Instance) -> list[str]:
    out: list[str] = []
    ids = inst.tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    inst.run(ids, SamplingParams(max_tokens=16, temperature=0), threading.Event(), lambda p: out.append(p.text))
    return out


def _instance(model_dir: Path, handover: str) -> Instance:
    return Instance(Settings(model_dir, handover, handover_timeout=10), MemfdArena(), load_tokenizer(model_dir))


def test_model_matches_transformers_reference(demo_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    inst = _instance(demo_model_dir, "")
    inst.load_from_dir()
    ref = AutoModelForCausalLM.from_pretrained(str(demo_model_dir)).eval()
    ids = torch.tensor([[1, 5, 40, 77, 300]])
    with torch.inference_mode():
        assert torch.allclose(inst.skeleton.model(ids).logits, ref(ids).logits, atol=1e-5)
    assert all(s.offset % 256 == 0 for s in inst.specs)
    assert len(inst.specs) == len(ref.state_dict())  # every weight, nothing else, is in the arena
    inst.release()


def test_snapshot_release_attach_round_trip(demo_model_dir: Path, blobstore: BlobstoreDouble) -> None:
    sid = "default/default/demo@1"
    first = _instance(demo_model_dir, blobstore.path)
    first.load_from_dir()
    before = _greedy(first)
    stored = first.snapshot(sid)
    assert stored["bytes"] == first.arena_bytes and stored["manifest_digest"]
    assert first.release()["ok"] and first.phase is Phase.RELEASED and first.arena.size == 0

    fresh = _instance(demo_model_dir, blobstore.path)  # standby: skeleton from the manifest
    fresh.phase = Phase.RELEASED
    assert fresh.attach(sid, -1)["bytes"] == first.arena_bytes
    assert fresh.phase is Phase.SERVING and _greedy(fresh) == before
    assert first.attach(sid)["ok"] and _greedy(first) == before  # re-attach after release
    assert blobstore.mapped == ["mapped", "mapped"]
    fresh.release()
    first.release()


def test_attach_of_unknown_snapshot_leaves_released(demo_model_dir: Path, blobstore: BlobstoreDouble) -> None:
    inst = _instance(demo_model_dir, blobstore.path)
    inst.phase = Phase.RELEASED
    from snapwake.errors import StartFailed

    with pytest.raises(StartFailed, match="unknown snapshot"):
        inst.attach("t/n/nothing@1")
    assert inst.phase is Phase.RELEASED


async def test_control_socket_and_phase_gate(demo_model_dir: Path, blobstore: BlobstoreDouble,
                                             tmp_path: Path) -> None:
    inst = _instance(demo_model_dir, blobstore.path)
    inst.load_from_dir()
    control = ControlServer(inst, str(tmp_path / "control.sock"))
    await control.start()
    app = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(inst, "demo")), base_url="http://rt")
    body = {"model": "demo", "prompt": "Hi", "max_tokens": 3, "temperature": 0}
    try:
        status = await request(control.path, {"op": "status"}, 5)
        assert status["phase"] == "serving" and status["pid"] == os.getpid() and status["inflight"] == 0
        snap = await request(control.path, {"op": "snapshot", "snapshot_id": "t/n/f@1"}, 10)
        assert snap["ok"] and snap["bytes"] == inst.arena_bytes
        assert (await request(control.path, {"op": "release"}, 10))["ok"]
        r = await app.post("/v1/completions", json=body)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert (await app.get("/health")).json() == {"phase": "released"}
        attached = await request(control.path, {"op": "attach", "snapshot_id": "t/n/f@1", "gpu": -1}, 10)
        assert attached["ok"] and attached["bytes"] == inst.arena_bytes
        assert (await app.post("/v1/completions", json=body)).status_code == 200
        bad = await request(control.path, {"op": "explode"}, 5)
        assert bad == {"ok": False, "error": "unknown op 'explode'"}
        missing = await request(control.path, {"op": "snapshot"}, 5)
        assert not missing["ok"] and "snapshot_id" in missing["error"]
    finally:
        await app.aclose()
        await control.stop()
        inst.release()


def test_standby_process_attaches_warms_releases(demo_model_dir: Path, blobstore: BlobstoreDouble,
                                                 tmp_path: Path) -> None:
    """The real CLI in standby mode, fed from a snapshot of a load-mode instance."""
    sid = "t/n/f@1"
    source = _instance(demo_model_dir, blobstore.path)
    source.load_from_dir()
    source.snapshot(sid)
    expected = "".join(_greedy(source))
    source.release()
    port, control = free_port(), str(tmp_path / "c.sock")
    proc = subprocess.Popen([sys.executable, "-m", "modelserver", "--model-dir", str(demo_model_dir), "--port", str(port),
                             "--start-mode", "standby", "--snapshot-id", sid, "--handover-socket", blobstore.path,
                             "--control-socket", control, "--log-level", "warning"])
    try:
        def phase() -> str:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()["phase"]
            except httpx.HTTPError:
                return ""
        wait_for(lambda: phase() == "released", 60, "standby released")
        assert blobstore.mapped == ["mapped"]  # attached once for the warm-up
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(20)
        sock.connect(control)
        send_message(sock, {"op": "attach", "snapshot_id": sid, "gpu": -1})
        assert recv_message(sock)[0]["ok"]
        sock.close()
        out = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=20, json={
            "model": "demo", "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0}).json()
        assert out["choices"][0]["text"] == expected
    finally:
        proc.terminate()
        proc.wait(15)
