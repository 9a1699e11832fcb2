"""Shared pieces of the nodeagent in-process tests (it holds no tests; named so it stays in
the nodeagent test files)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from google.protobuf.duration_pb2 import Duration

from snapwake.v1 import nodeagent_pb2, types_pb2

FUNCTION_ID = "default/default/demo"


def start_request(instance_id: str, model_dir: Path, target: int = nodeagent_pb2.START_TARGET_RUNNING,
                  timeout_s: int = 90, revision: int = 1) -> nodeagent_pb2.StartInstanceRequest:
    spec = types_pb2.FunctionSpec(
        tenant="default", namespace="default", name="demo", image="builtin", model_dir=str(model_dir),
        sample_request=json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 2}))
    return nodeagent_pb2.StartInstanceRequest(
        instance_id=instance_id, function_id=FUNCTION_ID, revision=revision, spec=spec, target=target,
        timeout=Duration(seconds=timeout_s))


def runc_ids(root: Path) -> list[str]:
    """Container ids under a runc root, straight from the runc binary."""
    out = subprocess.run([shutil.which("runc") or "runc", "--root", str(root), "list", "--format", "json"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    return [c["id"] for c in json.loads(out or "null") or []]
