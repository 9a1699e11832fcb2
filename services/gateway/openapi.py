"""The gateway's OpenAPI document, served at ``/openapi.json``: every route, with the request
bodies generated from the shared pydantic models (``snapwake.openai.SCHEMAS``) and the error
responses the gateway answers.

Nothing here is written twice: the bodies are ``model_json_schema`` of the models the gateway
validates with, and the caps are this gateway's own (``EdgeLimits``: ``max_tokens``, ``n`` and
``messages`` get a ``maximum`` / ``maxItems``), so a client generated from the document sends
what this gateway takes. What only a validator knows (the built-in model server takes ``n`` = 1
and one prompt, a model's context length) is in the descriptions; those are 400s naming the
field. A user image's function takes any body the edge limits allow and answers for itself;
the document describes the built-in model server's schema, the strictest one.

Every error is the one OpenAI error body (``snapwake.openai.errors``); 429 and 503 carry
``Retry-After``. The document is built once per app from its config (``openapi_document``).
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic.json_schema import models_json_schema

from services.gateway.limits import EdgeLimits
from snapwake.openai import SCHEMAS

__all__ = ["ERROR_STATUSES", "openapi_document"]

Json = dict[str, Any]
_REF = "#/components/schemas/{model}"
_FUNC_PREFIX = "/funcs/{tenant}/{namespace}/{name}"
# What each error status means at this gateway (errors.py, snapwake.errors).
ERROR_STATUSES: dict[str, str] = {
    "400": "A bad request; ``param`` names the field (deep or malformed JSON: ``body``).",
    "401": "Missing or unknown API key.",
    "404": "No such function (model) for this API key.",
    "409": "The function is in a state that cannot serve the request.",
    "413": "The body is over this gateway's ``max_body_bytes``.",
    "429": "The function's queue is full, or the API key is over its rate or in-flight limit.",
    "503": "No instance within the function's queue timeout, a start that failed, or an instance that "
           "could not be reached.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Whole seconds to wait before retrying.", "required": True,
                                "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
# The schema of snapwake.openai.error_body's answer (which alone builds one).
_ERROR_FIELDS: Json = {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}
_ERROR_BODY: Json = {"type": "object", "required": ["error"], "additionalProperties": False,
                     "properties": {"error": _ERROR_FIELDS}}
_MODEL: Json = {"type": "object", "required": ["id", "object", "created", "owned_by"],
                "properties": {"id": {"type": "string"}, "object": {"const": "model"},
                               "created": {"type": "integer"}, "owned_by": {"type": "string"}}}
_MODEL_LIST: Json = {"type": "object", "required": ["object", "data"],
                     "properties": {"object": {"const": "list"},
                                    "data": {"type": "array", "items": {"$ref": _REF.format(model="Model")}}}}
_COMPLETION: Json = {
    "type": "object", "required": ["id", "object", "created", "model", "choices"],
    "description": "The function's answer, relayed (a user image's with its ``model`` rewritten).",
    "properties": {"id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"},
                   "model": {"type": "string"}, "choices": {"type": "array", "items": {"type": "object"}},
                   "usage": {"type": "object"}},
}
_RESPONSE: Json = {
    "type": "object", "required": ["id", "object", "created_at", "model", "status", "output"],
    "description": "A Responses API answer (``/v1/responses``).",
    "properties": {"id": {"type": "string"}, "object": {"const": "response"}, "created_at": {"type": "integer"},
                   "model": {"type": "string"}, "status": {"type": "string"},
                   "output": {"type": "array", "items": {"type": "object"}}, "usage": {"type": ["object", "null"]}},
}
# One server-sent event (OpenAPI before 3.2: ``schema`` describes each event of a stream).
_EVENT: Json = {
    "type": "object", "required": ["data"],
    "description": "``data`` is a JSON chunk, then ``[DONE]``; a failure after the stream began is one "
                   "last event whose data is the OpenAI error body.",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
}
_NOTES = {
    "/v1/chat/completions": "For the built-in model server, every field is honoured or refused with a 400 "
                            "naming it; a prompt and max_tokens must fit the model's context.",
    "/v1/completions": "The built-in model server takes one prompt; echo, best_of and suffix are refused; a "
                       "prompt and max_tokens must fit the model's context.",
    "/v1/embeddings": "For a built-in function of an embedding model (last-token pooled, normalised): strings or "
                      "token ids, float or base64; a chat model's function answers 400.",
    "/v1/responses": "The Responses API, text in and out (streamed as typed events or not); tools, reasoning "
                     "and previous_response_id are refused with a 400.",
}


def _errors(*statuses: str) -> Json:
    out: Json = {}
    for status in statuses:
        response: Json = {"description": ERROR_STATUSES[status],
                          "content": {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}}}
        if status in ("429", "503"):
            response["headers"] = copy.deepcopy(_RETRY_AFTER)
        out[status] = response
    return out


def _cap(prop: Json, cap: int, key: str = "maximum") -> None:
    """Adds ``key: cap`` to ``prop`` (or to its non-null ``anyOf`` branches); 0: no cap."""
    if not cap:
        return
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") in ("integer", "array"):
            branch[key] = cap


def _body_schemas(limits: EdgeLimits) -> Json:
    _, top = models_json_schema([(m, "validation") for m in SCHEMAS.values()], ref_template=_REF)
    defs: Json = top["$defs"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = defs[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens"):
            _cap(props[field], limits.max_tokens)
        _cap(props["n"], limits.max_n)
    _cap(defs["ChatCompletionRequest"]["properties"]["messages"], limits.max_messages, "maxItems")
    return defs


def _generation(path: str, per_function: bool) -> Json:
    schema = SCHEMAS[path].__name__
    # /v1 routes find the function by ``model``; a per-function URL names it in the path.
    body: Json = ({"$ref": _REF.format(model=schema)} if per_function
                  else {"allOf": [{"$ref": _REF.format(model=schema)}], "required": ["model"]})
    return {"post": {
        "operationId": ("func_" if per_function else "") + path.strip("/").replace("/", "_"),
        "description": _NOTES[path],
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {
            "200": {"description": "The function's answer: JSON, or server-sent events when ``stream`` is true.",
                    "content": {"application/json": {"schema": {"$ref": _REF.format(
                        model="Response" if path == "/v1/responses" else "Completion")}},
                                "text/event-stream": {"schema": _EVENT}}},
            **_errors("400", "401", "404", "409", "413", "429", "503")},
    }}


def _get(operation_id: str, schema: str, *statuses: str, description: str = "") -> Json:
    ok = {"description": description or schema,
          "content": {"application/json": {"schema": {"$ref": _REF.format(model=schema)}}}}
    return {"get": {"operationId": operation_id, "responses": {"200": ok, **_errors(*statuses)}}}


def _path_params(*names: str) -> list[Json]:
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]


def openapi_document(limits: EdgeLimits, max_body_bytes: int) -> Json:
    """The OpenAPI 3.1 document of a gateway with these caps."""
    paths: Json = {
        "/healthz": {"get": {"operationId": "healthz", "security": [], "responses": {"200": {
            "description": "The gateway is up.", "content": {"application/json": {"schema": {
                "type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}}}}}}},
        "/openapi.json": {"get": {"operationId": "openapi", "security": [], "responses": {"200": {
            "description": "This document.", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        "/metrics": {"get": {"operationId": "metrics", "description": "Prometheus text; an operator key only.",
                             "responses": {"200": {"description": "The gateway's series.",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}},
                                           **_errors("401")},
                             }},
        "/v1/models": _get("list_models", "ModelList", "401", "429", "503", description="The caller's functions."),
        "/v1/models/{model}": {**_get("get_model", "Model", "401", "404", "429", "503"),
                               "parameters": _path_params("model")},
        _FUNC_PREFIX + "/v1/models": {**_get("func_list_models", "ModelList", "401", "404", "429", "503"),
                                      "parameters": _path_params("tenant", "namespace", "name")},
    }
    paths["/metrics"]["get"]["responses"]["403"] = {
        "description": "A tenant's API key where an operator key is needed.",
        "content": {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}}}
    for path in SCHEMAS:
        paths[path] = _generation(path, per_function=False)
        paths[_FUNC_PREFIX + path] = {**_generation(path, per_function=True),
                                      "parameters": _path_params("tenant", "namespace", "name")}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Snapwake gateway", "version": "1",
                 "description": "The OpenAI-compatible API of a Snapwake gateway (docs/CONTRACTS.md). "
                                f"Bodies over {max_body_bytes} bytes are refused with 413."},
        "paths": paths,
        "components": {
            "schemas": {**_body_schemas(limits), "Error": _ERROR_BODY, "Model": _MODEL, "ModelList": _MODEL_LIST,
                        "Completion": _COMPLETION, "Response": _RESPONSE},
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}],
    }
