"""The logic behind each endpoint: find the function, queue for a claim, relay to the instance.

``OpenAIServing`` depends only on the ``SchedulerClient`` interface, so the same code runs over
gRPC in production and over an in-memory scheduler in tests. A user image's requests carry its
``served_model_name`` and its answers the client's model id (``rewrite``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from starlette.responses import Response
from starlette.types import ASGIApp

from services.gateway.config import GatewayConfig
from services.gateway.errors import error_response
from services.gateway.limits import check_body
from services.gateway.metrics import GatewayMetrics
from services.gateway.models import FunctionCatalog, function_id_for, model_id_for
from services.gateway.protocol import Routing, check_request
from services.gateway.proxy import InstanceNotServing, InstanceUnreachable, RelayResponse, Upstream
from services.gateway.queue import ClaimQueue
from services.gateway.rewrite import ModelRewrite
from services.gateway.scheduler_client import Claim, FunctionInfo, SchedulerClient
from snapwake import errors, telemetry
from snapwake.openai import SCHEMAS, parse_json, validate
from snapwake.openai.structured import SchemaChecker, forced_schema
from snapwake.v1 import types_pb2

__all__ = ["ENDPOINTS", "OpenAIServing", "RequestContext"]

log = logging.getLogger(__name__)

# The generation endpoints (instance-side paths); their bodies' schemas are in SCHEMAS.
ENDPOINTS = tuple(SCHEMAS)


@dataclass
class RequestContext:
    """Per-request facts from the middleware and the URL."""

    request_id: str
    tenant: str
    arrival: float  # time.monotonic() at arrival
    fixed_function: str | None = None  # per-function URLs fix the function by path


class OpenAIServing:
    """Models listing and generation requests for every function behind one gateway."""

    def __init__(self, client: SchedulerClient, config: GatewayConfig, metrics: GatewayMetrics,
                 upstream: Upstream | None = None) -> None:
        self.metrics = metrics
        self.catalog = FunctionCatalog(client, ttl=config.models_cache_seconds)
        self.queue = ClaimQueue(client, config.default_queue_len, config.default_queue_timeout,
                                on_depth=lambda f, n: metrics.queue_depth.labels(f).set(n))
        self.upstream = upstream or Upstream(config.connect_timeout, config.read_timeout,
                                             dead_node_timeout=config.dead_node_timeout)
        self.rpc_timeout = config.rpc_timeout
        self.retry_after = config.retry_after
        self.max_body_bytes = config.max_body_bytes
        self.limits = config.edge_limits
        self.schemas = SchemaChecker()

    @staticmethod
    def _model_card(fn: FunctionInfo) -> dict[str, Any]:
        return {"id": model_id_for(fn.function_id), "object": "model", "created": fn.created_unix,
                "owned_by": fn.tenant}

    async def list_models(self, tenant: str, function_id: str | None = None) -> dict[str, Any]:
        """``GET /v1/models``: every deployed function, running or scaled to zero."""
        functions = [await self.catalog.get(function_id)] if function_id else await self.catalog.list(tenant)
        return {"object": "list", "data": [self._model_card(f) for f in functions]}

    async def get_model(self, model: str, tenant: str) -> dict[str, Any]:
        """``GET /v1/models/{model}``; ``NotFound`` with param ``model``."""
        return self._model_card(await self.catalog.get(function_id_for(model, tenant), model))

    def error(self, exc: BaseException) -> Response:
        return error_response(exc, self.retry_after)

    async def generate(self, path: str, raw: bytes, ctx: RequestContext) -> ASGIApp:
        """``POST`` of a generation endpoint; every failure comes back as an OpenAI error.

        The body is checked (the edge limits, then ``protocol.check_request``, then a structured
        output schema's compile) before the queue:
        a request over a limit, or one the function's server would refuse, costs no claim and no
        start. The metrics' function label is a function the catalogue knows, else "unknown":
        made-up URLs and model names add no series."""
        label = "unknown"
        try:
            body = parse_json(raw)
            check_body(body, self.limits)
            fn = await self._resolve(validate(body, Routing).model, ctx)
            label = fn.function_id
            streaming = check_request(path, body, fn)
            if fn.builtin:  # a schema the grammar engine cannot compile: refused here too
                await self._check_schema(path, body)
            if "model" not in body:  # a per-function URL needs none; the instance may want one
                raw = json.dumps({**body, "model": model_id_for(fn.function_id)}).encode()
            rewrite = None
            if not fn.builtin:  # the built-in model server echoes the request's model itself
                rewrite = ModelRewrite(str(body.get("model") or model_id_for(fn.function_id)), fn.served_model_name)
                raw = rewrite.request(body, raw)
            response = await self._forward(fn, path, raw, streaming, ctx, rewrite)
        except Exception as exc:  # noqa: BLE001 - the HTTP boundary: everything becomes an OpenAI error
            response = self.error(exc)
        status = getattr(response, "status_code", 200)
        self.metrics.requests.labels(label, str(status)).inc()
        return response

    async def _check_schema(self, path: str, body: dict[str, Any]) -> None:
        """The ``response_format`` JSON schema of a (valid) chat request, and a forced tool call's,
        must compile (bounded: ``snapwake.openai.structured``)."""
        if path != "/v1/chat/completions":
            return
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            spec = fmt["json_schema"]
            await self.schemas.check(spec.get("schema"), bool(spec.get("strict")))
        choice, tools = body.get("tool_choice"), body.get("tools")
        if tools and (choice == "required" or isinstance(choice, dict)):  # a forced call: its grammar
            name = choice["function"]["name"] if isinstance(choice, dict) else None
            await self.schemas.check(forced_schema(tools, name), True, field="tools")

    async def _resolve(self, model: str | None, ctx: RequestContext) -> FunctionInfo:
        if ctx.fixed_function is not None:
            fn = await self.catalog.get(ctx.fixed_function)
        elif model is None:
            raise errors.InvalidArgument("model: field required", field="model")
        else:
            fn = await self.catalog.get(function_id_for(model, ctx.tenant), model)
        if fn.state == types_pb2.FUNCTION_STATE_FAILED:
            raise errors.StartFailed(f"function {fn.function_id} failed to deploy: {fn.status_message}")
        return fn

    async def _claim(self, fn: FunctionInfo, ctx: RequestContext) -> Claim:
        started = time.monotonic()
        try:
            # The queue carries this span's context into its worker, so claim.acquire nests here.
            async with telemetry.traced("queue.wait", attributes={"snapwake.function_id": fn.function_id}):
                return await self.queue.acquire(fn, ctx.request_id)
        finally:
            self.metrics.queue_wait.labels(fn.function_id).observe(time.monotonic() - started)

    def _first_byte(self, fn: FunctionInfo, claim: Claim, ctx: RequestContext) -> Callable[[], None]:
        def observe() -> None:
            _first_token_span(ctx, claim)
            if claim.source.started:
                elapsed = time.monotonic() - ctx.arrival
                self.metrics.cs_ttft.labels(fn.function_id, claim.source.name.lower()).observe(elapsed)
                log.info("first byte %.3fs after arrival (%s)", elapsed, claim.source.name,
                         extra={"request_id": ctx.request_id, "instance_id": claim.instance_id})
        return observe

    async def _forward(self, fn: FunctionInfo, path: str, raw: bytes, streaming: bool,
                       ctx: RequestContext, rewrite: ModelRewrite | None) -> ASGIApp:
        """Relays on one claim; when the instance did not answer, or answered that it is not
        serving (503: a claim that raced its instance's parking), once more on another claim."""
        claim = await self._claim(fn, ctx)
        try:
            return await self._attempt(fn, claim, path, raw, streaming, ctx, rewrite)
        except (InstanceUnreachable, InstanceNotServing) as exc:
            log.warning("%s; retrying on another instance", exc.message, extra={"request_id": ctx.request_id})
            # The scheduler hears that the instance failed before it grants the next claim, or
            # it could grant the same unreachable instance again.
            await self.queue.released(claim, self.rpc_timeout)
        return await self._attempt(fn, await self._claim(fn, ctx), path, raw, streaming, ctx, rewrite)

    async def _attempt(self, fn: FunctionInfo, claim: Claim, path: str, raw: bytes, streaming: bool,
                       ctx: RequestContext, rewrite: ModelRewrite | None) -> ASGIApp:
        """One try on ``claim``; the claim is released on every path out of here, or handed to
        the ``RelayResponse`` that releases it when the stream ends."""
        failed, handed_over = False, False
        try:
            response = await self.upstream.open(claim, path, raw, ctx.request_id)
            content_type = response.headers.get("content-type", "application/json")
            # How the instance came to serve this request, for clients and benchmarks.
            headers = {"x-snapwake-claim-source": claim.source.name.lower(),
                       "x-snapwake-instance": claim.instance_id}
            if streaming and response.status_code == 200 and content_type.startswith("text/event-stream"):
                relay = RelayResponse(response, self._first_byte(fn, claim, ctx),
                                      lambda broke: self.queue.release(claim, broke), headers=headers,
                                      rewrite=rewrite.stream() if rewrite is not None else None)
                handed_over = True
                return relay
            content = await self.upstream.read(response, claim)
            if response.status_code == 503:
                raise InstanceNotServing(f"instance {claim.instance_id} is not serving: "
                                         f"{content[:200].decode(errors='replace')}")
            self._first_byte(fn, claim, ctx)()
            if rewrite is not None:
                content = rewrite.response(content, content_type)
            return Response(content, status_code=response.status_code, media_type=content_type, headers=headers)
        except InstanceUnreachable:
            failed = True
            raise
        finally:
            if not handed_over:
                self.queue.release(claim, failed)


def _first_token_span(ctx: RequestContext, claim: Claim) -> None:
    """A span from the request's arrival to its first byte, so traces show the TTFT itself."""
    elapsed_ns = int((time.monotonic() - ctx.arrival) * 1e9)
    span = trace.get_tracer("snapwake").start_span(
        "first_token", start_time=time.time_ns() - elapsed_ns,
        attributes={"snapwake.claim_source": claim.source.name.lower(), "snapwake.instance_id": claim.instance_id})
    span.end()
