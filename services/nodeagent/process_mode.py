"""PROCESS snapshot mode: the driver checkpoints and restores every CUDA process of the container.

Nothing inside the container cooperates (the mode is meant for images the platform did not
build), so the standby is a normally started instance (model server ``--start-mode load``) that the
nodeagent warms up with the function's sample request over HTTP; then the driver moves the
entire GPU state (weights included) of each CUDA process of the container into its host memory
(``Checkpointer.checkpoint_all``: all locked first; one that cannot be checkpointed, such as
processes sharing memory through CUDA IPC on drivers before 610, fails the checkpoint, and so
the deploy validation, naming the process). Restore is the driver
restore alone: no blobstore DMA, no attach. Suspend is the checkpoint again. It is slower than
the arena mode (the driver moves about 4 GB/s) and does not survive a node restart.

On a host without a GPU the checkpointer is a no-op, so the same flow runs with the process
simply left as it is; only the GPU path shows the mode's cost.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import httpx

from services.nodeagent import probe
from services.nodeagent.gpu import Checkpointer
from snapwake import errors
from snapwake.v1 import types_pb2

__all__ = ["is_process", "restore", "warm_up", "warm_up_request"]


def is_process(spec: types_pb2.FunctionSpec) -> bool:
    """Whether the function's instances are whole-process checkpoints."""
    return spec.policy.snapshot_mode == types_pb2.SNAPSHOT_MODE_PROCESS


def warm_up_request(sample: str, model: str = "warm-up") -> tuple[str, dict[str, Any]] | None:
    """(path, body) of the warm-up request for ``sample`` (a JSON body), None when there is none.

    A body with ``prompt`` is a completion, otherwise a chat completion; it is never streamed.
    Its ``model`` is ``model`` unless the sample names one.
    """
    if not sample:
        return None
    try:
        body = json.loads(sample)
    except ValueError as exc:
        raise errors.InvalidArgument(f"spec.sample_request is not JSON: {exc}", field="spec.sample_request") from exc
    if not isinstance(body, dict):
        raise errors.InvalidArgument("spec.sample_request must be a JSON object", field="spec.sample_request")
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    return path, {"model": model, **body, "stream": False}


async def warm_up(http: httpx.AsyncClient, endpoint: str, sample: str, limit_s: float,
                  model: str = "warm-up") -> None:
    """Sends the sample request so every kernel is loaded before the checkpoint; a refused or
    failed answer raises ``StartFailed``."""
    request = warm_up_request(sample, model)
    if request is None:
        return
    path, body = request
    try:
        resp = await http.post(f"http://{endpoint}{path}", json=body, timeout=limit_s)
    except httpx.HTTPError as exc:
        raise errors.StartFailed(f"warm-up request to {endpoint}{path} failed: {exc!r}") from exc
    if resp.status_code != 200:
        raise errors.StartFailed(f"warm-up request to {endpoint}{path} answered {resp.status_code}: "
                                 f"{resp.text[:300]}")


async def restore(checkpointer: Checkpointer, http: httpx.AsyncClient, pids: Sequence[int], endpoint: str,
                  gpu: bool, health_path: str = "/health") -> float:
    """Driver-restores the container's checkpointed processes and checks it serves; returns the
    restore's seconds."""
    seconds = await checkpointer.restore_all(pids) if gpu else 0.0
    phase = await probe.health_phase(http, endpoint, path=health_path)
    if phase != "serving":
        raise errors.StartFailed(f"after the driver restore the model server at {endpoint} "
                                 f"answers {phase or 'nothing'} instead of serving")
    return seconds
