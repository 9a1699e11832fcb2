"""HTTP routes of the model server (Starlette). Thin: parse, gate on the phase, call serving."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from modelserver.engine import Engine
from modelserver.grammar import Grammars
from modelserver.instance import Instance, Phase
from modelserver.metrics import ServerMetrics
from modelserver.openai import responses, serving
from modelserver.openai.embeddings import embed
from modelserver.openai.requests import prepare_chat, prepare_completion
from snapwake.errors import NotFound, SnapwakeError, Unavailable
from snapwake.openai import RETRYABLE, ModelLimits, check_serves, error_body, openai_error, parse_json

__all__ = ["create_app"]


def error_response(exc: SnapwakeError) -> JSONResponse:
    """A domain error as the OpenAI error response (the shared mapping, as the gateway's)."""
    status, body = openai_error(exc)
    headers = {"Retry-After": "1"} if status in RETRYABLE else None
    return JSONResponse(body, status, headers=headers)


async def _answer(request: Request, streaming: bool, cancel: threading.Event,
                  stream: Callable[[], AsyncIterator[bytes]],
                  collect: Callable[[], Awaitable[dict[str, Any]]]) -> Response:
    """SSE events, or the whole answer as JSON while a watcher cancels it if the client leaves."""
    if streaming:
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    watcher = asyncio.create_task(_watch_disconnect(request, cancel))
    try:
        return JSONResponse(await collect())
    finally:
        watcher.cancel()


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel.set()


def create_app(instance: Instance, served_model: str) -> Starlette:
    """The OpenAI-compatible app for one instance; ``served_model`` is listed in /v1/models."""
    created = int(time.time())
    metrics = ServerMetrics(instance)
    compilers: list[Grammars] = []

    def grammars(engine: Engine) -> Grammars:
        """The instance's grammar compiler, made on the first structured request."""
        if not compilers:
            config: Any = engine.model.config
            compilers.append(Grammars(instance.tokenizer, int(config.vocab_size), engine.eos_ids))
        return compilers[0]

    def gate(path: str | None = None) -> None:
        """Serving, and (for ``path``) a model that serves it: embeddings or generation."""
        if instance.phase is not Phase.SERVING:
            raise Unavailable(f"the model is not serving (phase {instance.phase.value})")
        if path is not None:
            check_serves(path, limits(), served_model)

    def limits() -> ModelLimits:
        embedder = instance.embedder
        if embedder is None:
            return ModelLimits()
        return ModelLimits(embedder.max_context, len(instance.tokenizer), True, embedder.embedding.size,
                           embedder.embedding.matryoshka)

    async def health(request: Request) -> Response:
        code = 200 if instance.phase is Phase.SERVING else 503
        return JSONResponse({"phase": instance.phase.value}, code)

    def card() -> dict[str, object]:
        engine = instance.engine
        return {"id": served_model, "object": "model", "created": created, "owned_by": "snapwake",
                "root": served_model, "parent": None,
                "max_model_len": engine.max_context if engine is not None else (
                    instance.embedder.max_context if instance.embedder is not None else None)}

    async def models(request: Request) -> Response:
        gate()
        return JSONResponse({"object": "list", "data": [card()]})

    async def model(request: Request) -> Response:
        gate()
        name = request.path_params["model"]
        if name != served_model:
            raise NotFound(f"The model '{name}' does not exist", field="model")
        return JSONResponse(card())

    async def complete(request: Request, chat: bool) -> Response:
        gate(request.url.path)
        body = parse_json(await request.body())
        engine = instance.engine
        if engine is None:
            raise Unavailable("the model is not serving")
        if chat:
            if "response_format" in body or "tools" in body:  # compiling a grammar takes a while: off the loop
                req = await asyncio.to_thread(prepare_chat, body, instance.tokenizer, engine.max_context,
                                              grammars(engine))
            else:
                req = prepare_chat(body, instance.tokenizer, engine.max_context)
        else:
            req = prepare_completion(body, instance.tokenizer, engine.max_context)
        cancel = threading.Event()
        return await _answer(request, req.params.stream, cancel, lambda: serving.stream(instance, req, chat, cancel, metrics),
                             lambda: serving.collect(instance, req, chat, cancel, metrics))

    async def create_response(request: Request) -> Response:
        gate(request.url.path)
        body = parse_json(await request.body())
        engine = instance.engine
        if engine is None:
            raise Unavailable("the model is not serving")
        req, parsed = responses.prepare(body, instance.tokenizer, engine.max_context)
        cancel = threading.Event()
        return await _answer(request, req.params.stream, cancel,
                             lambda: responses.stream(instance, req, parsed, cancel, metrics),
                             lambda: responses.collect(instance, req, parsed, cancel, metrics))

    async def embeddings(request: Request) -> Response:
        gate(request.url.path)
        body = parse_json(await request.body())
        embedder = instance.embedder
        if embedder is None:
            raise Unavailable("the model is not serving")
        instance.inflight += 1
        instance.inflight_peak = max(instance.inflight_peak, instance.inflight)
        try:
            return JSONResponse(await embed(body, embedder, instance.tokenizer, limits(), metrics))
        finally:
            instance.inflight -= 1
            instance.last_request_unix = time.time()

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    async def on_error(request: Request, exc: Exception) -> Response:
        return error_response(exc)  # type: ignore[arg-type]

    async def on_http_error(request: Request, exc: Exception) -> Response:
        """A route or method the server lacks: an OpenAI error body, never plain text."""
        code = getattr(exc, "status_code", 500)
        if code == 405:
            return JSONResponse(error_body(f"{request.method} {request.url.path}: method not allowed",
                                           "invalid_request_error", None, "method_not_allowed"), 405)
        return JSONResponse(error_body(f"{request.url.path}: no such route on this model server",
                                       "invalid_request_error", None, "not_found"), code if code >= 400 else 404)

    routes = [Route("/health", health), Route("/v1/models", models), Route("/v1/models/{model:path}", model),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/responses", create_response, methods=["POST"]),
              Route("/v1/embeddings", embeddings, methods=["POST"]), Route("/metrics", prometheus)]
    return Starlette(routes=routes, exception_handlers={SnapwakeError: on_error, HTTPException: on_http_error})
