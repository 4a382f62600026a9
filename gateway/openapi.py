"""/openapi.json: the paths by hand, the request schemas from the pydantic models."""
from __future__ import annotations

from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema

from gateway.admin import WeightsUpdateRequest
from gateway.protocol import ChatCompletionRequest, CompletionRequest

_ERROR = {"description": "OpenAI-style error",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"},
    "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _generation(summary: str, schema: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{schema}"}}}},
        "responses": {
            "200": {"description": "A JSON body, or server-sent events when stream is true",
                    "content": {"application/json": {}, "text/event-stream": {}}},
            **{code: _ERROR for code in ("400", "401", "404", "413", "429", "503")}},
    }}


def _get(summary: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}


@cache
def openapi_schema(model_name: str) -> dict[str, Any]:
    _, defs = models_json_schema(
        [(ChatCompletionRequest, "validation"), (CompletionRequest, "validation"),
         (WeightsUpdateRequest, "validation")],
        ref_template="#/components/schemas/{model}")
    schemas = {**defs.get("$defs", {}), "Error": _ERROR_SCHEMA}
    return {
        "openapi": "3.1.0",
        "info": {"title": "plumbline", "version": "0.1.0",
                 "description": f"OpenAI-compatible API serving {model_name}"},
        "paths": {
            "/v1/chat/completions": _generation("Create a chat completion", "ChatCompletionRequest"),
            "/v1/completions": _generation("Create a text completion", "CompletionRequest"),
            "/v1/models": _get("List the served model"),
            "/v1/models/{model}": _get("Describe the served model"),
            "/v1/server_info": _get("Every setting that changes numerics or scheduling, the "
                                    "weights version and library versions"),
            "/v1/admin/weights": {"post": {
                "summary": "Load new weights while serving (admin key; 404 when disabled)",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/WeightsUpdateRequest"}}}},
                "responses": {"200": {"description": "The new weights version"},
                              **{code: _ERROR for code in ("400", "401", "404", "503")}}}},
            "/v1/traces/{request_id}": _get("The diagnostic trace of a recent request, by "
                                            "completion id or X-Request-Id (404 once evicted)"),
            "/health": _get("Liveness"),
            "/ready": _get("Readiness: 503 until the model is loaded and while draining"),
            "/metrics": _get("Prometheus metrics"),
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
