"""/openapi.json: the paths by hand; request bodies from the pydantic models in protocol.py, the
response bodies from the models below, errors in OpenAI's error format.

The response models describe what responses.py, routes.py and admin.py build as dicts; nothing
constructs them (building the bodies through pydantic would cost a validation per chunk). The
schemathesis run in tests/gateway/test_openapi.py holds every answer to them. Path parameters are
declared so that schema-driven clients and fuzzers can call those routes.
"""
from __future__ import annotations

from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from gateway.admin import WeightsUpdateRequest
from gateway.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                              TokenizeChatRequest, TokenizeCompletionRequest, ToolCall)

# ------------------------------------------------------------------------- response bodies


class _Body(BaseModel):
    """A response body: the fields listed are always there; more may come (extensions)."""

    model_config = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(BaseModel):
    """OpenAI's error object; every 4xx and 5xx of the API carries one."""

    error: ErrorDetail


class Usage(_Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(_Body):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


FinishReasonName = Literal["stop", "length", "tool_calls", "content_filter", "abort", "error"]


class ChatChoice(_Body):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReasonName | None


class ChatCompletion(_Body):
    """The body of a non-streaming chat completion (the `plumbline` extension may follow)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str]


class ChunkDelta(_Body):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Body):
    index: int
    delta: ChunkDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName | None


class ChatCompletionChunk(_Body):
    """One `data:` event of a streamed chat completion; the last, with include_usage, has no
    choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Body):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReasonName | None


class Completion(_Body):
    """The body of a non-streaming completion, and (without usage) each streamed event."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Model(_Body):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class Status(_Body):
    status: str


class ServerInfo(_Body):
    object: Literal["server_info"]
    ready: bool
    model: dict[str, Any]
    numerics: dict[str, Any]
    scheduling: dict[str, Any]
    grammar: dict[str, Any]
    engine_config: dict[str, Any]
    versions: dict[str, str | None]
    admin: dict[str, bool]


class WeightsUpdateResponse(_Body):
    object: Literal["weights_update"]
    weights_version: int
    mode: Literal["pause", "drain", "abort"]
    reset_cache: bool
    path: str
    duration_s: float


class Trace(_Body):
    """A recent request's diagnostic trace (gateway/guard/traces.py)."""

    object: Literal["plumbline.trace"]
    id: str
    http_request_id: str | None
    endpoint: str
    timestamps: dict[str, float | None]
    prompt_ids: list[int]
    logprobs_mode: str
    choices: list[dict[str, Any]]


_REQUESTS: tuple[type[BaseModel], ...] = (
    ChatCompletionRequest, CompletionRequest, WeightsUpdateRequest, TokenizeCompletionRequest,
    TokenizeChatRequest, DetokenizeRequest)
_RESPONSES: tuple[type[BaseModel], ...] = (
    Error, ChatCompletion, ChatCompletionChunk, Completion, Model, ModelList, TokenizeResponse,
    DetokenizeResponse, Status, ServerInfo, WeightsUpdateResponse, Trace)

# ------------------------------------------------------------------------------------ paths


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR_DESCRIPTIONS = {
    "400": "Invalid request (the error's param names the field)",
    "401": "Missing or invalid API key", "404": "No such resource",
    "413": "Request body too large", "429": "Queue full (Retry-After says when to retry)",
    "500": "Internal error", "503": "Not ready: the model is loading, or the server drains"}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: _json(_ref("Error"), _ERROR_DESCRIPTIONS[code]) for code in codes}


def _post(summary: str, request: dict[str, Any], ok: dict[str, Any],
          *codes: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
        "responses": {"200": ok, **_errors(*codes)}}}


def _event(chunk: str) -> dict[str, Any]:
    """One server-sent event of a stream (as schemathesis and OpenAPI 3.1 tools read the
    `schema` of text/event-stream): its data a JSON chunk or error, or the final `[DONE]`."""
    data = {"type": "string", "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [_ref(chunk), _ref("Error")]}}
    return {"type": "object", "required": ["data"],
            "properties": {"data": {"anyOf": [{"const": "[DONE]"}, data]}}}


def _generation(summary: str, request: str, body: str, chunk: str) -> dict[str, Any]:
    ok = {"description": f"A {body}; with stream true, server-sent events: `data:` lines each "
                         f"holding a {chunk} (or an error that ended the stream), then "
                         "`data: [DONE]`",
          "content": {"application/json": {"schema": _ref(body)},
                      "text/event-stream": {"schema": _event(chunk)}}}
    return _post(summary, _ref(request), ok, "400", "401", "404", "413", "429", "500", "503")


def _get(summary: str, ok: dict[str, Any], *codes: str, public: bool = False,
         path_param: tuple[str, str] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": ok, **_errors(*codes)}}
    if public:
        op["security"] = []
    if path_param is not None:
        name, description = path_param
        op["parameters"] = [{"name": name, "in": "path", "required": True,
                             "description": description, "schema": {"type": "string"}}]
    return {"get": op}


def _health() -> dict[str, Any]:
    op = _get("Liveness", _json(_ref("Status")), public=True)
    op["get"]["responses"]["503"] = _json(_ref("Status"), "The model failed to load")
    return op


def _paths() -> dict[str, Any]:
    return {
        "/v1/chat/completions": _generation("Create a chat completion", "ChatCompletionRequest",
                                            "ChatCompletion", "ChatCompletionChunk"),
        "/v1/completions": _generation("Create a text completion", "CompletionRequest",
                                       "Completion", "Completion"),
        "/v1/models": _get("List the served model", _json(_ref("ModelList")), "401"),
        "/v1/models/{model}": _get(
            "Describe the served model", _json(_ref("Model")), "401", "404",
            path_param=("model", "the served model's id (or the --model argument)")),
        "/v1/server_info": _get("Every setting that changes numerics or scheduling, the "
                                "weights version and library versions",
                                _json(_ref("ServerInfo")), "401"),
        "/v1/admin/weights": _post(
            "Load new weights while serving (admin key; 404 when disabled)",
            _ref("WeightsUpdateRequest"), _json(_ref("WeightsUpdateResponse")),
            "400", "401", "404", "413", "503"),
        "/v1/traces/{request_id}": _get(
            "The diagnostic trace of a recent request (404 once evicted)",
            _json(_ref("Trace")), "401", "404",
            path_param=("request_id", "a completion id (chatcmpl-..., cmpl-...) or the "
                                      "request's X-Request-Id")),
        "/v1/traces/{request_id}/tokens": _get(
            "The trace with each token's text and the closing steps, for the console's viewer "
            "(the same access rules)", _json({"type": "object"}), "401", "404",
            path_param=("request_id", "a completion id or the request's X-Request-Id")),
        "/v1/stats": _get("The live numbers of /metrics as one JSON object (the console)",
                          _json({"type": "object"}), "401"),
        "/tokenize": _post(
            "vLLM's tokenize: a prompt, or messages through the chat template",
            {"oneOf": [_ref("TokenizeCompletionRequest"), _ref("TokenizeChatRequest")]},
            _json(_ref("TokenizeResponse")), "400", "401", "404", "413", "503"),
        "/detokenize": _post("vLLM's detokenize: token ids to text", _ref("DetokenizeRequest"),
                             _json(_ref("DetokenizeResponse")), "400", "401", "404", "413",
                             "503"),
        "/health": _health(),
        "/ready": _get("Readiness: 503 until the model is loaded and while draining",
                       _json(_ref("Status")), "503", public=True),
        "/metrics": _get("Prometheus metrics", {"description": "The text exposition format",
                                                "content": {"text/plain": {"schema": {
                                                    "type": "string"}}}}, public=True),
    }


_REQUEST_ID = {"description": "The request's id: the client's X-Request-Id when it is sane, "
                             "else a fresh one (the log line and the trace carry it too)",
               "required": True, "schema": {"type": "string"}}


def _with_request_id(paths: dict[str, Any]) -> dict[str, Any]:
    """Every answer carries X-Request-Id (gateway/logs.py sets it on all of them)."""
    for item in paths.values():
        for op in item.values():
            for response in op["responses"].values():
                response["headers"] = {"X-Request-Id": _REQUEST_ID}
    return paths


@cache
def openapi_schema(model_name: str) -> dict[str, Any]:
    _, defs = models_json_schema(
        [(m, "validation") for m in _REQUESTS] + [(m, "serialization") for m in _RESPONSES],
        ref_template="#/components/schemas/{model}")
    return {
        "openapi": "3.1.0",
        "info": {"title": "plumbline", "version": "0.1.0",
                 "description": f"OpenAI-compatible API serving {model_name}"},
        "paths": _with_request_id(_paths()),
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        # An API key when the server has any (--api-key); without keys none is asked for.
        "security": [{"bearer": []}, {}],
    }
