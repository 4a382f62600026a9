"""/openapi.json: the paths by hand, the request schemas from the pydantic models.

Path parameters are declared so that schema-driven clients and fuzzers can call those routes.
"""
from __future__ import annotations

from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema

from gateway.admin import WeightsUpdateRequest
from gateway.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                              TokenizeChatRequest, TokenizeCompletionRequest)

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


def _get_by(summary: str, name: str, description: str) -> dict[str, Any]:
    """A GET whose last path segment names the resource; 404 when there is none."""
    op = _get(summary)
    op["get"]["parameters"] = [{"name": name, "in": "path", "required": True,
                                "description": description, "schema": {"type": "string"}}]
    op["get"]["responses"].update({code: _ERROR for code in ("401", "404")})
    return op


def _post(summary: str, request: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
        "responses": {"200": {"description": "OK", "content": {"application/json": {
            "schema": response}}},
            **{code: _ERROR for code in ("400", "401", "404", "413", "503")}}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_TOKENIZE_RESPONSE = {"type": "object", "required": ["count", "max_model_len", "tokens"],
                      "properties": {
                          "count": {"type": "integer"}, "max_model_len": {"type": "integer"},
                          "tokens": {"type": "array", "items": {"type": "integer"}},
                          "token_strs": {"type": ["array", "null"], "items": {"type": "string"},
                                         "description": "with return_token_strs"}}}
_DETOKENIZE_RESPONSE = {"type": "object", "required": ["prompt"],
                        "properties": {"prompt": {"type": "string"}}}


@cache
def openapi_schema(model_name: str) -> dict[str, Any]:
    _, defs = models_json_schema(
        [(ChatCompletionRequest, "validation"), (CompletionRequest, "validation"),
         (WeightsUpdateRequest, "validation"), (TokenizeCompletionRequest, "validation"),
         (TokenizeChatRequest, "validation"), (DetokenizeRequest, "validation")],
        ref_template="#/components/schemas/{model}")
    schemas = {**defs.get("$defs", {}), "Error": _ERROR_SCHEMA,
               "TokenizeResponse": _TOKENIZE_RESPONSE, "DetokenizeResponse": _DETOKENIZE_RESPONSE}
    return {
        "openapi": "3.1.0",
        "info": {"title": "plumbline", "version": "0.1.0",
                 "description": f"OpenAI-compatible API serving {model_name}"},
        "paths": {
            "/v1/chat/completions": _generation("Create a chat completion", "ChatCompletionRequest"),
            "/v1/completions": _generation("Create a text completion", "CompletionRequest"),
            "/v1/models": _get("List the served model"),
            "/v1/models/{model}": _get_by("Describe the served model", "model",
                                          "the served model's id (or the --model argument)"),
            "/v1/server_info": _get("Every setting that changes numerics or scheduling, the "
                                    "weights version and library versions"),
            "/v1/admin/weights": {"post": {
                "summary": "Load new weights while serving (admin key; 404 when disabled)",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/WeightsUpdateRequest"}}}},
                "responses": {"200": {"description": "The new weights version"},
                              **{code: _ERROR for code in ("400", "401", "404", "503")}}}},
            "/v1/traces/{request_id}": _get_by(
                "The diagnostic trace of a recent request (404 once evicted)", "request_id",
                "a completion id (chatcmpl-..., cmpl-...) or the request's X-Request-Id"),
            "/tokenize": _post(
                "vLLM's tokenize: a prompt, or messages through the chat template",
                {"oneOf": [_ref("TokenizeCompletionRequest"), _ref("TokenizeChatRequest")]},
                _ref("TokenizeResponse")),
            "/detokenize": _post("vLLM's detokenize: token ids to text",
                                 _ref("DetokenizeRequest"), _ref("DetokenizeResponse")),
            "/health": _get("Liveness"),
            "/ready": _get("Readiness: 503 until the model is loaded and while draining"),
            "/metrics": _get("Prometheus metrics"),
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
