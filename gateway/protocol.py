"""The OpenAI wire format: request models and their validation, and the one place where errors
become OpenAI error JSON with a status code and `FinishReason` becomes a string (what a request
asks of the engine, grammar and sampling parameters, is mapped in `request_params.py`).

Request models are strict (no "1" for 1, no true for 1). Nested objects forbid unknown fields (a
typo inside a message is a 400 naming it); the top level of a request allows them, and
`gateway/fields.py` sorts them into ignored, refused and unknown (a warning and a header, or a
400 with --strict-fields), as vLLM does. vLLM's extra-body names are accepted where they mean the
same thing; our own fields live in the `plumbline` object.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine import FinishReason

_M = TypeVar("_M", bound=BaseModel)

# ---------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """A client-visible error; `status`, `type` and `code` follow OpenAI's error object."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, param: str | None = None, *, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class BadRequest(APIError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class NotSupported(BadRequest):
    code = "not_supported"


class Unauthorized(APIError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class NotFound(APIError):
    status, type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(APIError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class PayloadTooLarge(APIError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class QueueFull(APIError):
    status, type, code = 429, "rate_limit_error", "queue_full"


class Unavailable(APIError):
    status, type, code = 503, "server_error", "unavailable"


class InternalError(APIError):
    pass


def internal_error() -> APIError:
    """What a client sees for an unexpected exception: never the exception itself."""
    return InternalError("internal server error; the server log has the details")


def from_validation_error(exc: ValidationError) -> BadRequest:
    """The first pydantic error as a 400 naming its parameter (`messages[0].content`)."""
    err = exc.errors(include_url=False)[0]
    param = _param_path(err["loc"])
    if err["type"] == "extra_forbidden":
        return BadRequest(f"unknown field '{param}'", param, code="unknown_field")
    if err["type"] == "missing":
        return BadRequest(f"'{param}' is required", param, code="missing_field")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return BadRequest(f"{param}: {msg}" if param else msg, param or None)


def _param_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in _TYPE_TAGS:   # union branches, not fields
            continue
        else:
            out += f".{part}" if out else part
    return out


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "text", "json_object",
              "json_schema"}


def parse(model: type[_M], body: Any) -> _M:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def finish_reason_name(reason: FinishReason, stopped_by_string: bool = False) -> str:
    """OpenAI's finish_reason. Our own stop-string abort is a "stop"."""
    if reason is FinishReason.ABORT and stopped_by_string:
        return "stop"
    return reason.value


def logprob_value(x: float) -> float:
    """JSON has no -inf; OpenAI reports -9999.0 for impossible tokens."""
    return -9999.0 if math.isinf(x) or math.isnan(x) else x


# ------------------------------------------------------------------------------ request models


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class _TopLevel(_Strict):
    """A request body: extra fields are kept in `model_extra` for gateway/fields.py to judge."""

    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)


class ContentPart(_Strict):
    type: str
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


class FunctionCall(_Strict):
    name: str
    arguments: str


# The wire models keep OpenAI's names (they name the /openapi.json schemas): ToolCall is a call
# in an earlier assistant message (the parser's own is tool_calls.ParsedToolCall), Tool a tool
# definition as sent (checked into grammars.tools.ToolSpec by request_params.tools_request).
class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise NotSupported(f"content parts of type '{part.type}' are not supported; "
                                   "send text parts", "messages")
            parts.append(part.text)
        return "".join(parts)


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat,
                           Field(discriminator="type")]


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` extra-body object (exactly one constraint)."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False   # vLLM: usage in every chunk (with include_usage)
    include_obfuscation: bool = True       # OpenAI: accepted, ignored (no padding is sent)


class PlumblineOptions(_Strict):
    """Our vendor extension: `"plumbline": {...}` in a request."""

    logprobs_mode: Literal["processed", "raw"] | None = None
    # The guard (gateway/guard/plan.py checks these and names the bad field in its 400):
    guard: Any = None         # {"mode", "release", "checks"} over the server defaults
    assertions: Any = None    # {"/json/pointer": value}: facts the response must not contradict
    session_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    # Constrained decoding (grammars/): budget-aware closing's reserve in tokens (0: off; None:
    # the server's), and the grammar library ("llguidance", "outlines", "xgrammar").
    close_reserve: Annotated[int, Field(ge=0, le=1 << 20, strict=True)] | None = None
    grammar_backend: str | None = None


NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]


class _GenerationRequest(_TopLevel):
    model: str
    max_tokens: PosInt | None = None
    temperature: Annotated[float, Field(ge=0.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=64)] = 1
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted and ignored: bookkeeping fields some clients always send
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # vLLM extra-body names
    top_k: int | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    ignore_eos: bool = False
    stop_token_ids: list[NonNegInt] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    min_tokens: NonNegInt = 0
    allowed_token_ids: Annotated[list[NonNegInt], Field(min_length=1)] | None = None
    priority: int = 0                 # vLLM: lower values are scheduled first; ties by arrival
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None   # vLLM: keep the last k
    prompt_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None   # vLLM: the prompt's
    bad_words: Annotated[list[Annotated[str, Field(min_length=1)]],
                         Field(max_length=256)] | None = None
    logprobs_mode: Literal["processed", "raw", "processed_logprobs", "raw_logprobs"] | None = None
    return_token_ids: bool = False    # prompt_token_ids and each choice's token_ids
    # structured output, vLLM's names
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    plumbline: PlumblineOptions | None = None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        for s in stop:
            if not s:
                raise BadRequest("stop strings must be non-empty", "stop")
        return tuple(stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def resolved_logprobs_mode(self) -> Literal["processed", "raw"]:
        if self.plumbline is not None and self.plumbline.logprobs_mode is not None:
            return self.plumbline.logprobs_mode
        if self.logprobs_mode is not None:
            return "raw" if self.logprobs_mode.startswith("raw") else "processed"
        return "processed"


class ChatCompletionRequest(_GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: PosInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True    # vLLM: False leaves the assistant header out
    continue_final_message: bool = False  # vLLM: the model continues the last message, open
    chat_template_kwargs: dict[str, Any] | None = None   # vLLM: extra variables for the template


class TokenizeCompletionRequest(_TopLevel):
    """vLLM's POST /tokenize, completions form."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True       # as /v1/completions tokenizes a prompt
    return_token_strs: bool = False


class TokenizeChatRequest(_TopLevel):
    """vLLM's POST /tokenize, chat form: the messages through the chat route's rendering."""

    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False      # the template writes its own special tokens
    return_token_strs: bool = False


class DetokenizeRequest(_TopLevel):
    model: str | None = None
    tokens: list[NonNegInt]


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=64)] | None = None
