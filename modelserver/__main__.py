"""python -m modelserver: the model server inside a function's container (docs/CONTRACTS.md).

Start modes:
  load      read the checkpoint into a model server-owned arena and serve.
  snapshot  as load, run the sample request once, then serve and wait for the control
            ``snapshot`` op.
  standby   attach once from the blobstore (``--snapshot-id``); the skeleton is built from the
            manifest's ``modelserver_config_json`` (the model dir is only read for the tokenizer),
            run the sample request so every kernel is loaded, release, and wait for ``attach``.
A start that fails exits with status 1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from opentelemetry.instrumentation.starlette import StarletteInstrumentor

from modelserver.arena import make_arena
from modelserver.config import ModelServerConfig
from modelserver.control import ControlServer
from modelserver.instance import Instance, Settings
from modelserver.openai import create_app
from modelserver.openai.requests import prepare_chat, prepare_completion
from snapwake.errors import SnapwakeError
from snapwake.service import bootstrap

log = logging.getLogger("modelserver")

DEFAULT_SAMPLE = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def load_tokenizer(model_dir: Path, chat_template: str = "") -> Any:
    """The model's tokenizer (tokenizer.json + tokenizer_config.json), local files only; a
    non-empty ``chat_template`` replaces its own (the spec's override)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def warm_up(instance: Instance, sample: dict[str, Any]) -> None:
    """Runs the sample request once (loads every kernel; checks the weights answer). An embedding
    model embeds the sample's ``input`` string (a chat sample: "Hello")."""
    if instance.embedder is not None:
        text = sample.get("input") if isinstance(sample.get("input"), str) and sample["input"] else "Hello"
        instance.embedder.embed([list(instance.tokenizer(text)["input_ids"])])
        return
    assert instance.engine is not None
    body = {"model": "warm-up", **sample, "stream": False}
    prepare = prepare_completion if "prompt" in body else prepare_chat
    req = prepare(body, instance.tokenizer, instance.engine.max_context)
    instance.run(req.prompt_ids, req.params, threading.Event(), lambda piece: None)


def start(cfg: ModelServerConfig, instance: Instance) -> None:
    """The start mode's steps (blocking; run in a worker thread)."""
    sample = json.loads(cfg.sample_request) if cfg.sample_request else DEFAULT_SAMPLE
    if cfg.start_mode == "standby":
        gpu = cfg.gpu_index if cfg.device == "cuda" else -1
        log.info("standby: attach %s: %s", cfg.snapshot_id, instance.attach(cfg.snapshot_id, gpu))
        warm_up(instance, sample)
        log.info("standby: release: %s", instance.release())
        return
    log.info("load: %s", instance.load_from_dir())
    if cfg.start_mode == "snapshot":
        warm_up(instance, sample)
        log.info("snapshot: warmed up; waiting for the snapshot op")


async def serve(cfg: ModelServerConfig) -> int:
    import uvicorn

    model_dir = Path(cfg.model_dir)
    # The tokenizer loads here, on the main thread, before any other thread imports: transformers'
    # lazy imports run on a worker thread beside the telemetry threads' own imports once left a
    # package half-found ("No module named 'httpcore2._trace'") inside a container under load.
    tokenizer = load_tokenizer(model_dir, cfg.chat_template)
    instance = Instance(Settings(model_dir, cfg.handover_socket, cfg.dtype or None,
                                 gpu_memory_bytes=cfg.gpu_memory_bytes, max_batch=cfg.max_batch,
                                 cuda_graphs=cfg.cuda_graphs, trim_on_release=cfg.standby_trim),
                        make_arena(cfg.device, cfg.gpu_index, cfg.gpu_memory_bytes, cfg.cuda_device,
                                   cfg.standby_trim),
                        tokenizer)
    control = ControlServer(instance, cfg.control_socket) if cfg.control_socket else None
    if control:
        await control.start()
    app = create_app(instance, cfg.served_model or model_dir.name)
    StarletteInstrumentor.instrument_app(app)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level.lower(),
                            lifespan="off", timeout_graceful_shutdown=5)
    config.load()  # its protocol imports on the main thread too, before the start thread runs
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        await asyncio.to_thread(start, cfg, instance)
    except SnapwakeError as exc:
        log.error("start (%s) failed: %s", cfg.start_mode, exc.message)
        server.should_exit = True
        await serving
        if control:
            await control.stop()
        return 1
    await serving
    if control:
        await control.stop()
    return 0


def main(argv: list[str] | None = None) -> None:
    # Kernels are loaded when first used, not all at context creation (torch sets the same when
    # it initialises CUDA; set here so it holds whoever creates the context first).
    os.environ.setdefault("CUDA_MODULE_LOADING", "LAZY")
    # As the services: a bad flag is one line naming it and exit status 2.
    cfg = bootstrap(ModelServerConfig, "modelserver", argv, prog="python -m modelserver")
    try:
        code = asyncio.run(serve(cfg))
    except Exception:  # noqa: BLE001 - any failure to start is fatal, and must be fast
        # Exit now, with the trace in the log: an orderly interpreter exit waits for worker and
        # exporter threads, and the nodeagent would see a hung start instead of a failed one.
        log.exception("model server failed")
        logging.shutdown()
        os._exit(1)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
