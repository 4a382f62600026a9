"""Endpoints. Thin: parse -> plan -> tokenize -> queue -> `Generation` -> a formatter from
`responses.py` -> SSE chunks or one JSON body."""
from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine import GenerateRequest, PreparedRequest, RequestError, SamplingParams
from grammars import GrammarError
from grammars.tools import ToolsRequest, render_prompt, tool_call_grammar
from gateway.generation import Generation
from gateway.generation_group import GenerationGroup
from gateway.guard import GuardPlan, Trace, plan_guard
from gateway.logs import log_fields
from gateway.protocol import (APIError, BadRequest, ChatCompletionRequest, ChatMessage,
                              CompletionRequest, NotFound, NotSupported)
from gateway.request_params import (check_text, fim_prompt, prompt_logprobs_asked,
                                    samples_per_prompt,
                                    sampling_params, structured_output_spec, tools_request,
                                    truncate_prompt)
from gateway.requests import parse_request, runtime
from gateway.completion_responses import CompletionFormatter
from gateway.responses import ChatFormatter, Formatter
from gateway.sse import DeferredJSONResponse, EventStreamResponse
from gateway.state import Runtime

Endpoint = Callable[[Request], Any]


# ----------------------------------------------------------------------------- plain endpoints


async def health(request: Request) -> Response:
    rt = runtime(request)
    if rt.load_error is not None:
        return JSONResponse({"status": "failed", "error": "the model failed to load"}, 503)
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    rt = runtime(request)
    try:
        rt.ready()
    except APIError as exc:
        return JSONResponse(exc.body(), exc.status)
    return JSONResponse({"status": "ready", "model": rt.config.model_name})


async def metrics(request: Request) -> Response:
    from gateway.metrics import CONTENT_TYPE

    rt = runtime(request)
    return Response(rt.metrics.render(rt), media_type=CONTENT_TYPE)


def _model_card(rt: Runtime) -> dict[str, Any]:
    card: dict[str, Any] = {"id": rt.config.model_name, "object": "model",
                            "created": rt.started_at, "owned_by": "plumbline"}
    if rt.engine is not None:
        card["max_model_len"] = rt.max_model_len
    return card


async def list_models(request: Request) -> Response:
    rt = runtime(request)
    return JSONResponse({"object": "list", "data": [_model_card(rt)]})


async def get_model(request: Request) -> Response:
    rt = runtime(request)
    check_model(rt, request.path_params["model"])
    return JSONResponse(_model_card(rt))


def check_model(rt: Runtime, model: str) -> None:
    if model not in (rt.config.model_name, rt.config.engine.model):
        raise NotFound(f"the model '{model}' does not exist; this server serves "
                       f"'{rt.config.model_name}'", "model", code="model_not_found")


# ------------------------------------------------------------------------------ shared pieces


async def prepare(rt: Runtime, kind: str, prompt_ids: Sequence[int], params: SamplingParams,
                  has_tools: bool) -> PreparedRequest:
    """The engine validates the request and compiles its grammar once, before the response
    starts: a bad request stays a 400, never an error event mid-stream."""
    engine, admission = rt.ready()
    if params.n > admission.capacity:
        raise BadRequest(f"n must be <= {admission.capacity}", "n")
    request = GenerateRequest(f"{kind}-{uuid.uuid4().hex}", tuple(prompt_ids), params)
    try:
        return await engine.prepare(request)
    except RequestError as exc:
        param = exc.param
        if param in ("prompt", "messages"):
            param = "messages" if kind == "chatcmpl" else "prompt"
        elif param == "response_format" and has_tools:
            param = "tools"
        raise BadRequest(exc.message, param) from None


async def respond(request: Request, rt: Runtime, req: Any, kind: str,
                  prompts: Sequence[Sequence[int]], params: SamplingParams,
                  formatter: Callable[[Runtime, Any, Any], Formatter],
                  plan: GuardPlan, tools: ToolsRequest | None = None) -> Any:
    """The shared tail of both generation routes: admission checks, grammar, then the stream
    (SSE) or the collected JSON body. Several prompts (completions) run as a GenerationGroup."""
    # every prompt is checked before any starts: a bad one is a 400 with nothing queued
    prepared = [await prepare(rt, kind, ids, params, tools is not None) for ids in prompts]
    gens: list[Generation] = []
    try:
        for p in prepared:
            gens.append(start(request, rt, kind, p, req.skip_special_tokens, plan, tools))
    except BaseException:          # e.g. the queue is full for a later prompt: free the others
        for g in gens:
            g.close()
        raise
    gen: Generation | GenerationGroup = gens[0] if len(gens) == 1 else GenerationGroup(gens)
    fmt = formatter(rt, gen, req)
    if req.stream:
        return EventStreamResponse(fmt.events(), ping_interval=rt.config.keepalive_interval_s,
                                   on_close=closer(request, gen))
    return DeferredJSONResponse(fmt.body, on_close=closer(request, gen))


def start(request: Request, rt: Runtime, kind: str, prepared: PreparedRequest,
          skip_special_tokens: bool, plan: GuardPlan | None = None,
          tools: ToolsRequest | None = None) -> Generation:
    _, admission = rt.ready()
    request_id, prompt_ids = prepared.request.request_id, prepared.request.prompt_token_ids
    params = prepared.request.sampling
    ticket = admission.enter(params.n, params.priority)
    trace = rt.traces.open(Trace(
        request_id, structlog.contextvars.get_contextvars().get("request_id"),
        "chat.completion" if kind == "chatcmpl" else "text_completion", list(prompt_ids),
        params.logprobs_mode, spec=params.grammar,
        owner=getattr(request.state, "trace_owner", None),
        guard=None if plan is None else {"mode": plan.policy.mode, "release": plan.policy.release,
                                         "checks": plan.policy.checks, "pinned": plan.pinned}))
    if params.grammar is not None:
        compile_s = prepared.grammar_compile_s
        trace.grammar = {"kind": params.grammar.kind, "backend": prepared.grammar_backend,
                         "compile_ms": None if compile_s is None else round(compile_s * 1000, 3),
                         "free_text": params.grammar.free_text}
    gen = Generation(rt, prepared, ticket,
                     skip_special_tokens=skip_special_tokens, parse_tool_calls=tools is not None,
                     plan=plan, trace=trace)
    log_fields(request.scope)["completion_id"] = gen.request_id
    return gen


def closer(request: Request, gen: Generation | GenerationGroup) -> Callable[[], None]:
    """Runs once when the response ends, whatever happened: slot, metrics, summary line."""
    fields = log_fields(request.scope)

    def close() -> None:
        gen.close()
        o = gen.outcome
        fields.update(prompt_tokens=o.num_prompt_tokens, completion_tokens=o.num_completion_tokens,
                      finish_reason=",".join(o.finish_reasons) or None,
                      ttft_ms=None if o.ttft_s is None else round(o.ttft_s * 1000, 1),
                      queue_ms=None if o.queue_s is None else round(o.queue_s * 1000, 1))
        verdicts = [v for v in (gen.trace.verdicts if gen.trace is not None else []) if v]
        if verdicts:   # the guard's verdict in short: passed | flagged | blocked, per choice
            fields["checks"] = ",".join("blocked" if v["blocked"] else
                                        "passed" if v["passed"] else "flagged" for v in verdicts)
    return close


# ------------------------------------------------------------------------------ chat completions


async def chat_completions(request: Request) -> Any:
    rt = runtime(request)
    rt.ready()
    req = await parse_request(request, rt, ChatCompletionRequest)
    check_model(rt, req.model)
    grammar = structured_output_spec(req)
    tools = tools_request(req)
    # before the tool grammar: enforce mode pins response_format's schema, never a tool grammar
    plan, grammar = await plan_guard(rt.policy, rt.sessions, req.plumbline, grammar, req.messages,
                               tools if tools is not None and tools.is_active else None,
                               may_loosen=rt.config.guard_client_override)
    if tools is not None and tools.is_active:
        try:    # with a response format: a call or a document in that format
            tools = dataclasses.replace(tools, answer_format=grammar)
            grammar = tool_call_grammar(tools, rt.tokenizer)
        except GrammarError as exc:
            raise NotSupported(f"tool calls cannot be served with this model: {exc}",
                               "tools") from None
    else:
        tools = None
    if req.top_logprobs is not None and not req.logprobs:
        raise BadRequest("top_logprobs needs logprobs set to true", "top_logprobs")
    if req.continue_final_message and req.add_generation_prompt:
        raise BadRequest("continue_final_message and add_generation_prompt cannot both be true "
                         "(set add_generation_prompt to false)", "continue_final_message")
    prompt_ids = truncate_prompt(
        render_chat(rt, req.messages, tools, req.add_generation_prompt,
                    continue_final_message=req.continue_final_message,
                    template_kwargs=req.chat_template_kwargs),
        req.truncate_prompt_tokens, rt.max_model_len)
    params = sampling_params(
        req, max_tokens=req.max_completion_tokens or req.max_tokens,
        num_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        num_prompt_logprobs=prompt_logprobs_asked(req),
        default_max_tokens=rt.max_model_len - len(prompt_ids), grammar=grammar,
        tokenizer=rt.tokenizer)
    return await respond(request, rt, req, "chatcmpl", [prompt_ids], params, ChatFormatter,
                         plan, tools=tools)


# apply_chat_template's own parameters: set by the request's fields, never by template kwargs
_TEMPLATE_OPTIONS = {"conversation", "messages", "tools", "documents", "chat_template",
                     "add_generation_prompt", "continue_final_message", "tokenize", "padding",
                     "truncation", "max_length", "return_tensors", "return_dict",
                     "return_assistant_tokens_mask", "tokenizer_kwargs"}


def render_chat(rt: Runtime, messages: list[ChatMessage], tools: ToolsRequest | None,
                add_generation_prompt: bool = True, add_special_tokens: bool = False, *,
                continue_final_message: bool = False,
                template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """The prompt: messages (with earlier tool calls and results) and the tools, through the
    model's chat template, or our own tool section when the template knows no tools. /tokenize
    renders through here too, so its counts are the chat route's. continue_final_message leaves
    the last message open (transformers cuts the text after its content), template_kwargs are
    variables for the template (vLLM's chat_template_kwargs)."""
    tokenizer = rt.tokenizer
    for key in template_kwargs or {}:
        if key in _TEMPLATE_OPTIONS:
            raise BadRequest(f"chat_template_kwargs may not set '{key}'; send the field itself "
                             "where there is one", "chat_template_kwargs")
    if not getattr(tokenizer, "chat_template", None):
        raise NotSupported("this model has no chat template; use /v1/completions", "messages")
    conversation = []
    for i, m in enumerate(messages):
        text = m.text()
        check_text(text, f"messages[{i}].content")
        message: dict[str, Any] = {"role": m.role, "content": text}
        if m.name is not None:
            message["name"] = m.name
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            for j, call in enumerate(m.tool_calls):
                check_text(call.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments")
            message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        conversation.append(message)
    try:
        prompt = render_prompt(tokenizer, conversation, tools, add_generation_prompt, {
            **(template_kwargs or {}), "continue_final_message": continue_final_message})
    except Exception as exc:  # a template may refuse a conversation (e.g. role order)
        raise BadRequest(f"the chat template rejected these messages: {exc}", "messages") from None
    return list(tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids)


# ------------------------------------------------------------------------------- completions


async def completions(request: Request) -> Any:
    rt = runtime(request)
    rt.ready()
    req = await parse_request(request, rt, CompletionRequest)
    check_model(rt, req.model)
    grammar = structured_output_spec(req)
    plan, grammar = await plan_guard(rt.policy, rt.sessions, req.plumbline, grammar,
                               may_loosen=rt.config.guard_client_override)
    if req.suffix and req.echo:      # the prompt is prefix, suffix and FIM tokens together
        raise BadRequest("echo cannot be combined with suffix", "suffix")
    prompts = [truncate_prompt(ids, req.truncate_prompt_tokens, rt.max_model_len)
               for ids in tokenize_prompts(rt, req.prompt, req.suffix)]
    params = sampling_params(req, max_tokens=req.max_tokens, num_logprobs=req.logprobs,
                             default_max_tokens=16,   # OpenAI's default for completions
                             num_prompt_logprobs=prompt_logprobs_asked(req),
                             grammar=grammar, tokenizer=rt.tokenizer, n=samples_per_prompt(req))
    return await respond(request, rt, req, "cmpl", prompts, params, CompletionFormatter, plan)


def tokenize_prompts(rt: Runtime, prompt: str | list[str] | list[int] | list[list[int]],
                     suffix: str | None = None) -> list[list[int]]:
    """OpenAI's prompt forms: a string, a list of strings, token ids, a list of token-id lists;
    with a suffix, each string prompt asks for the middle (fill-in-the-middle)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise BadRequest("prompt must not be an empty list", "prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]               # type: ignore[list-item]
    if suffix:
        check_text(suffix, "suffix")
        if not all(isinstance(p, str) for p in prompt):
            raise BadRequest("suffix needs text prompts, not token ids", "suffix")
    out = []
    for i, p in enumerate(prompt):
        if not isinstance(p, str):
            out.append(list(p))
            continue
        check_text(p, "prompt" if len(prompt) == 1 else f"prompt[{i}]")
        out.append(fim_prompt(rt.tokenizer, p, suffix) if suffix
                   else list(rt.tokenizer(p).input_ids))
    return out


def tokenize_prompt(rt: Runtime, prompt: str | list[int],
                    add_special_tokens: bool = True) -> list[int]:
    if isinstance(prompt, str):
        check_text(prompt, "prompt")
        return list(rt.tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids)
    return list(prompt)        # type: ignore[arg-type]


